"""Where a compiled step's time goes, from its optimized HLO: op categories and a roofline estimate.

    compiled = jax.jit(train.train_step, donate_argnums=0).lower(state, batch).compile()
    prof = hlo_profile.profile(compiled.as_text(), hlo_profile.chip_peaks(jax.devices()[0]))
    print(hlo_profile.table({"float32": prof32, "bfloat16": prof}))

Every top-level instruction of the entry computation (a fusion, a cuDNN / cuBLAS custom call, a
bare convolution, dot or copy) is one kernel; it is put in one category:

* ``convolution``: a convolution, a cuDNN convolution call, or a fusion that contains one;
* ``matmul``: a dot, a cuBLAS call, or a fusion that contains a dot;
* ``optimizer update``: an instruction whose source stack runs through optax's transforms or
  ``apply_updates`` (HLO metadata, ``stack_frame_id``);
* ``dtype casts``: a convert, or a fusion that only converts (and moves) data, such as float32
  params cast to bfloat16 each step;
* ``copy/transpose``: a copy, a transpose, or a fusion that only moves data;
* ``BatchNorm/elementwise``: every other fusion (normalization, activations, reductions, the
  loss);
* ``other``: anything else with a cost (a custom call that is neither, a loop, a collective).

Its cost: FLOPs of the convolutions and dots it holds (2 x output elements x the reduction size),
and the bytes it moves (its operands and results, each buffer once). Its estimated time is
``max(flops / peak_flops, bytes / bandwidth) + per_op_s`` with the chip's peaks
(:func:`chip_peaks`): the roofline of each kernel plus a fixed cost per kernel (launch and tail).
This is an estimate, not a trace: its total is reported next to the measured step time so the
reader sees how much of the step the model explains. It needs no profiler, so it runs the same on a
CPU (a smoke test, with nominal peaks) as on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

CATEGORIES = ("convolution", "matmul", "BatchNorm/elementwise", "optimizer update",
              "copy/transpose", "dtype casts", "other")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1,
                "f8e5m2fnuz": 1, "token": 0}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([\d,]*)\]")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency"}
_MOVES = {"copy", "transpose", "reshape", "bitcast", "slice", "concatenate", "pad", "reverse",
          "dynamic-slice", "dynamic-update-slice", "broadcast", "iota", "parameter", "constant",
          "get-tuple-element", "tuple", "copy-start", "copy-done"}
_OPTIMIZER_FILES = re.compile(r"optax/(_src|transforms|contrib)/")


@dataclasses.dataclass(frozen=True)
class ChipPeaks:
  """A chip's peak rates: FLOP/s for bfloat16/float16, TF32 (float32 at JAX's default precision
  on NVIDIA GPUs) and full float32 math, memory bandwidth in bytes/s, and the fixed cost of one
  kernel in seconds. ``nominal`` says the figures are placeholders (a CPU, an unknown chip)."""
  name: str
  bf16_flops: float
  tf32_flops: float
  f32_flops: float
  bytes_per_s: float
  per_op_s: float
  nominal: bool = False


# Dense (no sparsity) peaks from the vendors' data sheets (SXM parts).
_PEAKS = (ChipPeaks("H200", 989e12, 494e12, 67e12, 4.8e12, 3e-6),
          ChipPeaks("H100", 989e12, 494e12, 67e12, 3.35e12, 3e-6),
          ChipPeaks("A100", 312e12, 156e12, 19.5e12, 2.0e12, 3e-6))


def chip_peaks(device: Any) -> ChipPeaks:
  """The peaks of ``device`` (a ``jax.Device``): a known NVIDIA part by its ``device_kind``, else
  nominal figures (a CPU: 1e11 FLOP/s, 2e10 B/s; an unknown GPU: the H100's)."""
  kind = str(getattr(device, "device_kind", ""))
  for peaks in _PEAKS:
    if peaks.name in kind:
      return peaks
  if getattr(device, "platform", "cpu") == "gpu":
    return dataclasses.replace(_PEAKS[1], name=f"{kind} (H100 peaks assumed)", nominal=True)
  return ChipPeaks(f"{kind or 'cpu'} (nominal)", 1e11, 1e11, 1e11, 2e10, 1e-6, nominal=True)


@dataclasses.dataclass
class _Instr:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str


def _bytes(shape: str) -> float:
  return sum(_DTYPE_BYTES[d] * math.prod(int(n) for n in dims.split(",") if n)
             for d, dims in _ARRAY.findall(shape))


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(d, tuple(int(n) for n in dims.split(",") if n)) for d, dims in _ARRAY.findall(shape)]


def _closing(s: str, start: int) -> int:
  """Index of the bracket closing ``s[start]`` (one of ``({[``), skipping quoted strings."""
  depth, quoted = 0, False
  for i in range(start, len(s)):
    c = s[i]
    if c == '"' and s[i - 1] != "\\":
      quoted = not quoted
    elif not quoted and c in "({[":
      depth += 1
    elif not quoted and c in ")}]":
      depth -= 1
      if depth == 0:
        return i
  raise ValueError(f"unbalanced brackets in HLO line: {s[:200]}")


_LINE = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+) = ")


def _parse_instr(line: str) -> _Instr | None:
  m = _LINE.match(line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith("("):
    end = _closing(rest, 0)
    shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  paren = rest.find("(")
  if paren < 0:
    return None
  opcode = rest[:paren]
  end = _closing(rest, paren)
  operands = re.findall(r"%([^\s,)]+)", rest[paren + 1:end])
  return _Instr(m.group(1), shape, opcode, operands, rest[end + 1:])


def parse_module(hlo_text: str) -> dict[str, Any]:
  """{"computations": name -> [instructions], "entry": name, "frames": stack frame id -> file
  names of its stack} of an HLO module's text (``compiled.as_text()``)."""
  comps: dict[str, list[_Instr]] = {}
  entry, current = None, None
  files, locations, frames = {}, {}, {}
  table = None
  for line in hlo_text.splitlines():
    stripped = line.strip()
    if stripped in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      table = stripped
      continue
    if current is None:
      head = re.match(r"^(ENTRY\s+)?%([^\s(]+) \(", line)
      if head and line.rstrip().endswith("{"):
        current = head.group(2)
        comps[current] = []
        entry = current if head.group(1) else entry
        table = None
        continue
      row = re.match(r"^(\d+) (.*)$", stripped)
      if table and row:
        key, val = int(row.group(1)), row.group(2)
        if table == "FileNames":
          files[key] = val.strip('"')
        elif table == "FileLocations":
          f = re.search(r"file_name_id=(\d+)", val)
          locations[key] = int(f.group(1)) if f else 0
        elif table == "StackFrames":
          loc = re.search(r"file_location_id=(\d+)", val)
          parent = re.search(r"parent_frame_id=(\d+)", val)
          frames[key] = (int(loc.group(1)) if loc else 0, int(parent.group(1)) if parent else 0)
      continue
    if stripped == "}":
      current = None
      continue
    instr = _parse_instr(line)
    if instr is not None:
      comps[current].append(instr)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  stack_files: dict[int, tuple[str, ...]] = {}
  for fid in frames:
    seen, names, f = set(), [], fid
    while f in frames and f not in seen:
      seen.add(f)
      names.append(files.get(locations.get(frames[f][0], 0), ""))
      f = frames[f][1]
    stack_files[fid] = tuple(names)
  return {"computations": comps, "entry": entry, "frames": stack_files}


def _attr(attrs: str, key: str) -> str | None:
  m = re.search(rf"\b{key}=", attrs)
  if not m:
    return None
  start = m.end()
  if start < len(attrs) and attrs[start] in "{[(":
    return attrs[start:_closing(attrs, start) + 1]
  if start < len(attrs) and attrs[start] == '"':
    return attrs[start + 1:attrs.index('"', start + 1)]
  return re.match(r"[^,\s}]*", attrs[start:]).group(0)


def _dims(text: str | None) -> list[int]:
  return [int(x) for x in re.findall(r"\d+", text or "")]


def _conv_flops(instr: _Instr, shapes: dict[str, str]) -> tuple[float, str]:
  """2 x forward-output elements x (kernel elements / output features), and the input dtype."""
  labels = _attr(instr.attrs, "dim_labels") or ""
  rhs = labels.split("_")[1].split("->")[0] if "_" in labels else ""
  ops = [_arrays(shapes.get(o, "")) for o in instr.operands[:2]]
  out = _arrays(instr.shape)
  if len(ops) < 2 or not ops[0] or not ops[1] or not out:
    return 0.0, "f32"
  target = _attr(instr.attrs, "custom_call_target") or ""
  if "BackwardInput" in target:
    fwd_out, kernel = ops[0][0][1], ops[1][0][1]
  elif "BackwardFilter" in target:
    fwd_out, kernel = ops[1][0][1], out[0][1]
  else:
    fwd_out, kernel = out[0][1], ops[1][0][1]
  o = rhs.find("o")
  if o < 0 or o >= len(kernel) or not kernel[o]:
    return 0.0, ops[0][0][0]
  return 2.0 * math.prod(fwd_out) * math.prod(kernel) / kernel[o], ops[0][0][0]


def _dot_flops(instr: _Instr, shapes: dict[str, str]) -> tuple[float, str]:
  lhs = _arrays(shapes.get(instr.operands[0], "")) if instr.operands else []
  out = _arrays(instr.shape)
  if not lhs or not out:
    return 0.0, "f32"
  if instr.opcode == "dot":
    contracting = _dims(_attr(instr.attrs, "lhs_contracting_dims"))
  else:  # cuBLAS: the dimension numbers live in the backend config's JSON
    m = re.search(r'lhs_contracting_dimensions\\?"\s*:\s*\[([^\]]*)\]', instr.attrs)
    contracting = _dims(m.group(1) if m else "")
  k = math.prod(lhs[0][1][d] for d in contracting if d < len(lhs[0][1]))
  return 2.0 * math.prod(out[0][1]) * k, lhs[0][0]


def _kind(instr: _Instr) -> str | None:
  """'conv', 'dot' or None for one instruction (custom calls by their target)."""
  if instr.opcode == "convolution":
    return "conv"
  if instr.opcode == "dot":
    return "dot"
  if instr.opcode == "custom-call":
    target = (_attr(instr.attrs, "custom_call_target") or "").lower()
    if "conv" in target:
      return "conv"
    if "gemm" in target or "matmul" in target:
      return "dot"
  return None


@dataclasses.dataclass
class OpCost:
  """One kernel: its name, opcode, category, FLOPs, bytes moved, the FLOP dtype class."""
  name: str
  opcode: str
  category: str
  flops: float
  bytes: float
  flop_dtype: str


def op_costs(hlo_text: str) -> list[OpCost]:
  """Category and cost of every top-level instruction of the module's entry computation."""
  mod = parse_module(hlo_text)
  comps, frames = mod["computations"], mod["frames"]
  shapes = {i.name: i.shape for body in comps.values() for i in body}

  def is_optimizer(instr: _Instr) -> bool:
    fid = _attr(instr.attrs, "stack_frame_id")
    stack = frames.get(int(fid), ()) if fid and fid.isdigit() else ()
    source = _attr(instr.attrs, "source_file") or ""
    return any(_OPTIMIZER_FILES.search(f) for f in stack + (source,))

  def inner(comp: str, seen: frozenset = frozenset()) -> list[_Instr]:
    out = []
    for i in comps.get(comp, []):
      out.append(i)
      for key in ("calls", "to_apply", "body", "condition"):
        called = _attr(i.attrs, key)
        for c in re.findall(r"%?([^\s,{}%]+)", called or ""):
          if c in comps and c not in seen:
            out += inner(c, seen | {c})
    return out

  costs = []
  for instr in comps[mod["entry"]]:
    if instr.opcode in _FREE:
      continue
    called = [c for key in ("calls", "to_apply", "body", "condition")
              for c in re.findall(r"%?([^\s,{}%]+)", _attr(instr.attrs, key) or "") if c in comps]
    body = [instr] + [i for c in called for i in inner(c, frozenset({c}))]
    flops, flop_dtype, kinds = 0.0, "f32", set()
    for i in body:
      kind = _kind(i)
      if kind:
        kinds.add(kind)
        f, dt = (_conv_flops if kind == "conv" else _dot_flops)(i, shapes)
        flops += f
        flop_dtype = dt
        if "highest" in (_attr(i.attrs, "operand_precision") or "").lower() and dt == "f32":
          flop_dtype = "f32-highest"
    compute = [i for i in body[1:] if i.opcode not in _MOVES] if called else (
        [] if instr.opcode in _MOVES else [instr])
    category = _category(instr, kinds, compute, bool(called),
                         lambda body=body: any(is_optimizer(i) for i in body))
    moved = _bytes(instr.shape) + sum(_bytes(shapes.get(o, "")) for o in dict.fromkeys(
        instr.operands))
    costs.append(OpCost(instr.name, instr.opcode, category, flops, moved, flop_dtype))
  return costs


def _category(instr: _Instr, kinds: set, compute: list, calls: bool,
              in_optimizer: Callable[[], bool]) -> str:
  """The category (one of :data:`CATEGORIES`) of a top-level instruction: by the kinds of
  FLOPs in its body, whether it comes from the optimizer's code, and what its body computes."""
  if "conv" in kinds:
    return "convolution"
  if "dot" in kinds:
    return "matmul"
  if in_optimizer():
    return "optimizer update"
  if instr.opcode in ("copy", "transpose", "copy-start", "copy-done") or (
      calls and instr.opcode == "fusion" and not compute):
    return "copy/transpose"
  # A lone convert too: XLA:CPU's elemental emitters leave it unfused at the top level.
  if instr.opcode == "convert" or (instr.opcode == "fusion"
                                   and all(i.opcode == "convert" for i in compute)):
    return "dtype casts"
  if instr.opcode == "fusion" or instr.opcode in ("reduce", "select", "add", "multiply",
                                                  "scatter", "gather"):
    return "BatchNorm/elementwise"
  return "other"


def _op_seconds(op: OpCost, peaks: ChipPeaks) -> float:
  rate = {"bf16": peaks.bf16_flops, "f16": peaks.bf16_flops, "f32": peaks.tf32_flops,
          "f32-highest": peaks.f32_flops}.get(op.flop_dtype, peaks.f32_flops)
  return max(op.flops / rate, op.bytes / peaks.bytes_per_s) + peaks.per_op_s


def profile(hlo_text: str, peaks: ChipPeaks) -> dict[str, dict[str, float]]:
  """Per category (:data:`CATEGORIES`, plus ``"total"``): ``ops``, ``gflop``, ``mb`` moved,
  ``est_ms`` (roofline + per-kernel cost) and ``share`` of the estimated step time."""
  out = {c: {"ops": 0, "gflop": 0.0, "mb": 0.0, "est_ms": 0.0} for c in CATEGORIES}
  for op in op_costs(hlo_text):
    row = out[op.category]
    row["ops"] += 1
    row["gflop"] += op.flops / 1e9
    row["mb"] += op.bytes / 2**20
    row["est_ms"] += 1e3 * _op_seconds(op, peaks)
  total = {k: sum(r[k] for r in out.values()) for k in ("ops", "gflop", "mb", "est_ms")}
  for r in out.values():
    r["share"] = r["est_ms"] / total["est_ms"] if total["est_ms"] else 0.0
  out["total"] = dict(total, share=1.0)
  return out


def table(profiles: dict[str, dict[str, dict[str, float]]],
          measured_ms: dict[str, float] | None = None) -> str:
  """A Markdown table of :func:`profile` results side by side (one column group per label, e.g.
  float32 and bfloat16), with the measured step times when given."""
  labels = list(profiles)
  head = "| category | " + " | ".join(f"{l} ops | {l} GFLOP | {l} MB | {l} est. ms | {l} share"
                                       for l in labels) + " |"
  lines = [head, "| --- |" + " ---: |" * 5 * len(labels)]
  for c in CATEGORIES + ("total",):
    cells = []
    for l in labels:
      r = profiles[l][c]
      cells.append(f"{r['ops']:,} | {r['gflop']:,.2f} | {r['mb']:,.1f} | {r['est_ms']:.3f} | "
                   f"{100 * r['share']:.0f}%")
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  if measured_ms:
    lines.append("")
    lines.append("measured step: " + ", ".join(f"{l} {ms:.3f} ms" for l, ms in measured_ms.items()))
  return "\n".join(lines)
