"""Counting what a sampling step asks of the host: aten ops dispatched and host syncs, on any device.

`StepCounter` is a TorchDispatchMode: every aten op that reaches a kernel passes through it (composite ops
as the ops they decompose into, as a GPU would launch them), so `ops` counts what a step dispatches. Among
them it names the ones that make a GPU's host wait for the device or copy host data to it (`syncs`):

- reading a value back: `Tensor.item`, `bool(t)`, `float(t)`, `int(t)` (all `aten::_local_scalar_dense`),
  `Tensor.tolist` (no aten op on the CPU, so the method is patched while counting);
- ops whose output size depends on the values: `nonzero`, `masked_select`, `unique`, indexing with a bool mask;
- tensors made from host data: `torch.tensor(...)`, `torch.as_tensor` of Python data, `torch.from_numpy`
  (`aten::lift_fresh`), and copies from the CPU to another device.

On the CPU nothing actually waits, but the same calls would on a GPU: the counts are the CPU's proxy for them.
Shared by benchmarks.host_overhead and tests/test_host_syncs.py.
"""
from collections import Counter
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

aten = torch.ops.aten
VALUE_READS = {aten._local_scalar_dense.default}
VALUE_SHAPED = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
                aten.unique_consecutive.default}
FROM_HOST = {aten.lift_fresh.default}
COPIES = {aten._to_copy.default, aten.copy_.default}


def _tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


def sync_kind(func, args, kwargs) -> str:
    """Why `func(*args, **kwargs)` would make a GPU's host wait (or copy host data to it), or '' when it would not."""
    if func in VALUE_READS:
        return "value read"
    if func in VALUE_SHAPED:
        return "value-shaped output"
    if func in FROM_HOST:
        return "tensor from host data"
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        if any(index.dtype in (torch.bool, torch.uint8) for index in _tensors(args[1:2])):
            return "value-shaped output"
    if func in COPIES:
        source = args[1] if func is aten.copy_.default else args[0]
        target = args[0].device if func is aten.copy_.default else (kwargs or {}).get("device") or source.device
        if source.device.type == "cpu" and torch.device(target).type != "cpu":
            return "host to device copy"
    return ""


class StepCounter(TorchDispatchMode):
    """Within `with StepCounter() as counted:` every dispatched aten op is counted in `counted.ops` (op name ->
    calls) and every host sync (see the module docstring) is listed in `counted.syncs` as (kind, op name).

    torch's flex_attention compiles itself, which dynamo refuses under a dispatch mode like this one: it is
    counted as one op (one kernel, as compiled) and runs with the mode set aside. torch's rms_norm is one op on CUDA
    (aten::_fused_rms_norm) but decomposes into 6-7 on the CPU (no CPU kernel): it is counted as one op too."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = Counter(), []
        self._patched = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        kind = sync_kind(func, args, kwargs)
        if kind:
            self.syncs.append((kind, str(func)))
        return func(*args, **(kwargs or {}))

    @property
    def op_count(self) -> int:
        return sum(self.ops.values())

    def _tolist(self, tolist):
        def counted(tensor):
            self.syncs.append(("value read", "Tensor.tolist"))
            return tolist(tensor)

        return counted

    def _opaque(self, kernel):
        def counted(*args, **kwargs):
            self.ops[kernel.__name__] += 1
            with _disable_current_modes():
                return kernel(*args, **kwargs)

        return counted

    def __enter__(self):
        from torch.nn.attention import flex_attention

        patches = ((torch.Tensor, "tolist", self._tolist), (flex_attention, "flex_attention", self._opaque),
                   (torch.nn.functional, "rms_norm", self._opaque))
        for owner, name, wrap in patches:
            original = getattr(owner, name)
            self._patched.append((owner, name, original))
            setattr(owner, name, wrap(original))
        return super().__enter__()

    def __exit__(self, *exc):
        while self._patched:
            setattr(*self._patched.pop())
        return super().__exit__(*exc)


class StepCounters:
    """A StepCounter per sampling step: `with StepCounters() as steps:` starts the first, and `steps.advance()` at
    the end of every step (from the sampler's on_step callback) starts the next; `steps.counted` lists them (the
    last one counts what ran after the last step)."""

    def __init__(self):
        self.counted = []

    def advance(self):
        if self.counted:
            self.counted[-1].__exit__(None, None, None)
        self.counted.append(StepCounter())
        self.counted[-1].__enter__()

    def __enter__(self):
        self.advance()
        return self

    def __exit__(self, *exc):
        self.counted[-1].__exit__(*exc)
