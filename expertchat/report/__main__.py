"""``python -m expertchat.report RUN_DIR``: rebuild a run folder's report, or a sweep folder's table."""

import sys

from expertchat.report.markdown import main

sys.exit(main())
