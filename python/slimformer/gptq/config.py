"""The GPTQ quantization config: what ``config.json["quantization_config"]`` holds.

One dataclass for the settings that the solver uses and the checkpoint records, read from and
written to the dict that AutoGPTQ, GPTQModel and transformers/optimum write (keys unknown to us, such
as GPTQModel's ``meta`` or optimum's ``modules_in_block_to_quantize``, are kept in ``extra`` and
written back unchanged).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .packing import CHECKPOINT_FORMATS, check_bits


@dataclass
class GPTQConfig:
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    static_groups: bool = False
    true_sequential: bool = True
    checkpoint_format: str = "gptq"
    mse: float = 0.0  # > 0: clipping-range search with this error norm (GPTQModel's "mse"); 0: min/max
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (one group per row), got {self.group_size}")
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must lie in (0, 1), got {self.damp_percent}")
        if self.mse < 0:
            raise ValueError(f"mse must be >= 0 (0: min/max grids), got {self.mse}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {self.checkpoint_format!r}")

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, "quant_method": "gptq", **d}

    @classmethod
    def from_dict(cls, d: dict) -> "GPTQConfig":
        """Parse a checkpoint's quantization config; raises ValueError for a non-GPTQ or bad one."""
        d = dict(d)
        method = str(d.pop("quant_method", "gptq")).lower()
        if method != "gptq":
            raise ValueError(f"quant_method is {method!r}, not 'gptq'")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: d.pop(k) for k in list(d) if k in names}
        # AutoGPTQ wrote no checkpoint_format before v2 existed; older files are v1 ("gptq").
        fmt = known.get("checkpoint_format") or "gptq"
        known["checkpoint_format"] = str(fmt).lower()
        for key in ("bits", "group_size"):
            if key in known:
                known[key] = int(known[key])
        known["mse"] = float(known.get("mse") or 0.0)
        return cls(**known, extra=d)
