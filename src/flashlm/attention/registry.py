"""Capability-based choice of an attention backend.

A backend is a module ``flashlm.attention.backends.<name>`` exposing ``BACKEND`` (see backends/base.py).
The registry imports them lazily, remembers why one could not load (a missing optional package, a
module that fails to import, no ``BACKEND`` yet), and for each call (an ``AttnCall``) takes the first
backend that is available and does not refuse it, in the order of the table for the call's kind
(dense, varlen, kvcache) and device family (cpu, sm90, other cuda): ``order.ORDERS``.

Overrides, strongest first: the ``backend=`` argument of every public function, the
``use_backend(name)`` context manager (a contextvar: scoped to the block, thread and task safe), the
``FLASHLM_ATTN_BACKEND`` environment variable. A forced backend that cannot serve a call raises a
InputError naming why. An automatic choice that lands on the slow reference path on a GPU warns once
per kind of call.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import warnings
from dataclasses import dataclass, field
from functools import cache

import torch

from ..errors import InputError
from . import order as _order
from .backends.base import AttnCall, Backend

ENV_VAR = "FLASHLM_ATTN_BACKEND"
AUTO = ("auto", "", None)

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("flashlm_attn_backend", default=None)
_loaded: dict[str, Backend | None] = {}
_load_errors: dict[str, str] = {}
_unavailable: dict[str, str | None] = {}  # name -> why it cannot run here (None: it can); fixed per process
_warned: set[str] = set()
_choice_cache: dict[tuple, str] = {}


def known_backends() -> tuple[str, ...]:
    """Every backend name the registry knows, in its preference order."""
    return tuple(_order.ORDER)


def _load(name: str) -> Backend | None:
    if name in _loaded:
        return _loaded[name]
    backend = None
    try:
        module = importlib.import_module(f"flashlm.attention.backends.{name}")
        backend = getattr(module, "BACKEND", None)
        if backend is None:
            _load_errors[name] = f"module flashlm.attention.backends.{name} defines no BACKEND (not implemented)"
    except Exception as exc:  # noqa: BLE001 (a broken optional backend must not take the others down)
        _load_errors[name] = f"import failed: {type(exc).__name__}: {exc}"
    _loaded[name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The backend object called ``name``; InputError if unknown or not loadable."""
    if name not in _order.ORDER:
        raise InputError(f"unknown attention backend {name!r}; known: {', '.join(_order.ORDER)}")
    backend = _load(name)
    if backend is None:
        raise InputError(f"attention backend {name!r} cannot be loaded: {_load_errors[name]}")
    return backend


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here at all, or None. Cached until ``reset_cache()``."""
    if name not in _unavailable:
        backend = _load(name)
        _unavailable[name] = (_load_errors.get(name, "not loadable") if backend is None
                              else backend.unavailable_reason())
    return _unavailable[name]


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, in preference order."""
    return [n for n in _order.ORDER if unavailable_reason(n) is None]


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force attention backend ``name`` inside the block (``None``/"auto": automatic choice).

    Scoped with a contextvar, so nested blocks, threads and asyncio tasks each see their own choice.
    """
    if name not in AUTO and name not in _order.ORDER:
        raise InputError(f"unknown attention backend {name!r}; known: {', '.join(_order.ORDER)} or 'auto'")
    token = _forced.set(None if name in AUTO else name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend(explicit: str | None = None) -> tuple[str | None, str]:
    """The backend forced for this call and by what: argument, context manager, environment."""
    if explicit not in AUTO:
        return explicit, "backend= argument"
    ctx = _forced.get()
    if ctx is not None:
        return ctx, "use_backend()"
    env = os.environ.get(ENV_VAR)
    if env not in AUTO:
        return env, f"{ENV_VAR}"
    return None, "automatic"


def refusal(name: str, call: AttnCall) -> str | None:
    """Why backend ``name`` cannot serve ``call`` (unavailable or refusing), or None."""
    reason = unavailable_reason(name)
    if reason is not None:
        return f"unavailable: {reason}"
    return _loaded[name].refuse(call)


@dataclass
class Explanation:
    """Which backend a call would use (``chosen``, None if none can) and why each other refused."""

    call: AttnCall
    chosen: str | None
    forced_by: str
    reasons: dict[str, str | None] = field(default_factory=dict)  # name -> refusal, None = capable
    table: str | None = None  # the order table that decided ("family/kind (source)"); None if forced

    def __str__(self) -> str:
        lines = [f"attention call: {self.call.describe()}",
                 f"choice ({self.forced_by}): {self.chosen or 'none'}"]
        if self.table:
            lines.append(f"order: {self.table}")
        for name, why in self.reasons.items():
            mark = "->" if name == self.chosen else "  "
            lines.append(f" {mark} {name:<12} {'can serve' if why is None else why}")
        return "\n".join(lines)


def explain_call(call: AttnCall, backend: str | None = None) -> Explanation:
    """Which backend would serve ``call`` (honouring the forced one, as ``select``) and every refusal."""
    name, how = forced_backend(backend)
    if name is not None and name not in _order.ORDER:
        return Explanation(call, None, how, {name: f"unknown backend; known: {', '.join(_order.ORDER)}"})
    table = None
    if name is not None:
        names = [name]
    else:
        names, table = _order.order_for(call.kind, _order.family(call.device_type, call.compute_capability))
    reasons = {n: refusal(n, call) for n in names}
    chosen = next((n for n in names if reasons[n] is None), None)
    return Explanation(call, chosen, how, reasons, table)


def select(call: AttnCall, backend: str | None = None) -> Backend:
    """The backend to run ``call``; raises InputError if the forced one or every one refuses."""
    name, how = forced_backend(backend)
    key = (call, name)
    chosen = _choice_cache.get(key)
    if chosen is None:
        if name is not None:
            if name not in _order.ORDER:
                raise InputError(f"attention backend {name!r} (from {how}) is unknown; "
                                 f"known: {', '.join(_order.ORDER)}")
            why = refusal(name, call)
            if why is not None:
                raise InputError(f"attention backend {name!r} (forced by {how}) cannot run "
                                 f"{call.describe()}: {why}")
            chosen = name
        else:
            exp = explain_call(call)
            if exp.chosen is None:
                detail = "; ".join(f"{n}: {w}" for n, w in exp.reasons.items())
                raise InputError(f"no attention backend can run {call.describe()} ({detail})")
            chosen = exp.chosen
            if chosen == "reference" and call.device_type != "cpu":
                _warn_slow(call, exp)
        _choice_cache[key] = chosen
    return _loaded[chosen]


def _warn_slow(call: AttnCall, exp: Explanation) -> None:
    tag = call.describe()
    if tag in _warned:
        return
    _warned.add(tag)
    others = "; ".join(f"{n}: {w}" for n, w in exp.reasons.items() if n != "reference" and w)
    warnings.warn(f"flashlm.attention: falling back to the slow reference backend (fp32 math, "
                  f"O(seqlen^2) memory) for {tag}. Why the fast backends refused: {others}",
                  RuntimeWarning, stacklevel=4)


def reset_cache() -> None:
    """Forget cached choices and load results (tests, or after installing a backend package)."""
    _choice_cache.clear()
    _loaded.clear()
    _load_errors.clear()
    _unavailable.clear()
    _warned.clear()


@cache
def compute_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for other devices; cached (it is asked on every call)."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))
