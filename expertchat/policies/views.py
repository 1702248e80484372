"""Views: one PEFT-wrapped base computing with a chosen LoRA adapter (or none), switched per call and restored.

Every stage reaches a model through a :class:`ModelView`; :class:`~expertchat.policies.lora.LoraPolicies` builds them. A
view calls a merged copy of base + adapter when one is available (:mod:`expertchat.policies.merging`), else switches the
adapter of the shared base for the call (:class:`AdapterSwitch`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch


class AdapterSwitch:
    """Switches the LoRA adapter a PEFT-wrapped model computes with, fast and reversibly.

    PEFT's ``set_adapter`` / ``disable_adapter`` walk every module (about 2000 in SmolLM2) and toggle
    ``requires_grad``: 16-26 ms per call here, as much as a decode step, and a view is called once per generated
    token. This sets the active adapter (or the disabled flag) on the LoRA layers only, caching the layer list,
    and puts back exactly what was there; trainable flags are never touched (views run without grad). It relies
    on PEFT's ``BaseTunerLayer._active_adapter`` / ``_disable_adapters`` (peft 0.21; a test checks that a view
    computes what ``set_adapter`` gives).
    """

    def __init__(self, peft: Any) -> None:
        self.peft = peft
        self._key: tuple[str, ...] | None = None
        self._layers: list[Any] = []
        self._modules: list[torch.nn.Module] = []

    def _refresh(self) -> None:
        key = tuple(self.peft.peft_config)
        if key != self._key:  # adapters were added or removed: LoRA layers may have appeared
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._modules = list(self.peft.modules())
            self._layers = [m for m in self._modules if isinstance(m, BaseTunerLayer)]
            self._key = key

    @contextlib.contextmanager
    def use(self, adapter: str | None) -> Iterator[None]:
        """Compute with ``adapter`` (``None``: the base, adapters disabled), in eval mode, then restore."""
        self._refresh()
        saved = [(m._active_adapter, m._disable_adapters) for m in self._layers]
        # eval mode: gradient checkpointing (active in train mode) would turn the KV cache off
        training = [m for m in self._modules if m.training] if self.peft.training else []
        for m in training:
            m.training = False
        for m in self._layers:
            if adapter is None:
                m._disable_adapters = True
            else:
                m._active_adapter, m._disable_adapters = adapter, False
        try:
            yield
        finally:
            for m, (active, disabled) in zip(self._layers, saved):
                m._active_adapter, m._disable_adapters = active, disabled
            for m in training:
                m.training = True


class ModelView:
    """A model handle that runs a (possibly shared) PEFT-wrapped base with one adapter active, or with the
    adapters disabled, always without grad and in eval mode, and restores the base's state afterwards.
    ``forward``, ``__call__`` and ``generate`` go to the merged copy of base + adapter when ``merged`` gives one,
    else switch the base's adapter for the call; everything else (``config``, ``parameters()``,
    ``generation_config``, ...) is the underlying model's.

    Args:
        model: the underlying transformers model (PEFT injects its LoRA layers into it in place).
        resolve: returns ``(AdapterSwitch or None, adapter name or None)`` at call time: no switch (no PEFT
            wrapper yet) means the plain model; ``None`` as adapter means the base with adapters disabled.
        merged: returns the merged copy to call instead (:class:`~expertchat.policies.merging.MergedCopies`), or None.
    """

    def __init__(self, model: torch.nn.Module, resolve: Callable[[], tuple[AdapterSwitch | None, str | None]],
                 merged: Callable[[], torch.nn.Module | None] = lambda: None) -> None:
        self._model = model
        self._resolve = resolve
        self._merged = merged

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __repr__(self) -> str:
        switch, adapter = self._resolve()
        return f"ModelView({type(self._model).__name__}, adapter={adapter if switch is not None else 'none'})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.active() as model:
            return model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self.active() as model:
            return model.generate(*args, **kwargs)

    @property
    def forward(self) -> Callable[..., Any]:
        @functools.wraps(self._model.forward)  # keeps the signature (generation code inspects it)
        def forward(*args: Any, **kwargs: Any) -> Any:
            with self.active() as model:
                return model.forward(*args, **kwargs)

        return forward

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        """The module to call, without grad: the merged copy, or the base with the view's adapter switched on."""
        with torch.no_grad():
            copy = self._merged()
            if copy is not None:
                yield copy
                return
            switch, adapter = self._resolve()
            if switch is None:
                yield self._model
            else:
                with switch.use(adapter):
                    yield self._model


class Reference(torch.nn.Module):
    """The DPO reference as TRL wants it (a module, not the policy object): a :class:`ModelView` of the
    policy's base with the reference adapter. Holds no parameters; the view is kept out of the module tree."""

    def __init__(self, view: ModelView) -> None:
        super().__init__()
        self._view = [view]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._view[0](*args, **kwargs)

    def get_base_model(self) -> torch.nn.Module:
        """The transformers model ``forward`` ends in (code that inspects its arguments reads this one's)."""
        view = self._view[0]
        return view.get_base_model() if hasattr(view, "get_base_model") else view._model
