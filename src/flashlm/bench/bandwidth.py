"""Memory bandwidth of the GPU a benchmark runs on, for its %-of-peak column.

Two figures per known GPU: the datasheet's, and what a device-to-device copy reached on this project's
machines (the practical ceiling of a memory-bound kernel such as decode, which reads every weight once
per token). The %-of-peak column uses the measured copy figure where there is one, else the
datasheet's, and says which (``PeakBandwidth.basis``). A GPU not in the table gets no %-of-peak column
unless ``--peak-gbs`` names the figure: a wrong default (the H100's figure on an H200 made decode look
1.4x closer to its limit than it was) is worse than none.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GPU_BANDWIDTH", "GPUBandwidth", "PeakBandwidth", "gpu_bandwidth", "peak_bandwidth"]


@dataclass(frozen=True)
class GPUBandwidth:
    """One row of the table: GB/s (1e9 bytes/s) of one GPU model."""

    gpu: str
    datasheet_gbs: float
    measured_copy_gbs: float | None
    source: str  # where the measured figure comes from


# torch.cuda.get_device_name() -> row key. Only names whose memory is known: an H100 PCIe (HBM2e,
# 2 TB/s) or an H200 NVL would get a wrong figure from a plain "H100"/"H200" substring match.
def _key(device_name: str) -> str | None:
    name = device_name.upper()
    if "H200" in name and "NVL" not in name:
        return "H200"
    if "H100" in name and "HBM3" in name:  # "NVIDIA H100 80GB HBM3": the SXM card
        return "H100 SXM"
    return None


GPU_BANDWIDTH = {
    row.gpu: row
    for row in (
        GPUBandwidth("H200", 4800.0, 4300.0, "device copy measured on the project's H200"),
        GPUBandwidth("H100 SXM", 3350.0, 3000.0, "device copy measured on the project's H100"),
    )
}


@dataclass(frozen=True)
class PeakBandwidth:
    """The figure a %-of-peak column divides by, and what it is.

    gbs: GB/s; basis: "measured copy", "datasheet" or "--peak-gbs"; gpu: the table row (None when
    given by --peak-gbs); label: one line for a table caption."""

    gbs: float
    basis: str
    gpu: str | None = None

    @property
    def label(self) -> str:
        if self.gpu is None:
            return f"% of peak = GB/s / {self.gbs:.0f} GB/s (given by --peak-gbs)"
        row = GPU_BANDWIDTH[self.gpu]
        return (f"% of peak = GB/s / {self.gbs:.0f} GB/s ({self.gpu}, {self.basis}; datasheet "
                f"{row.datasheet_gbs:.0f} GB/s)")

    def as_dict(self) -> dict[str, object]:
        return {"peak_gbs": self.gbs, "peak_basis": self.basis, "peak_gpu": self.gpu, "peak_label": self.label}


def gpu_bandwidth(device_name: str | None) -> GPUBandwidth | None:
    """The table row of a ``torch.cuda.get_device_name()`` string, None when unknown (or no GPU)."""
    if not device_name:
        return None
    key = _key(device_name)
    return GPU_BANDWIDTH.get(key) if key else None


def peak_bandwidth(device_name: str | None, peak_gbs: float | None = None) -> PeakBandwidth | None:
    """The %-of-peak divisor: ``peak_gbs`` when given, else the GPU's measured copy figure (or its
    datasheet figure when none was measured); None for an unknown GPU or the CPU."""
    if peak_gbs is not None:
        return PeakBandwidth(float(peak_gbs), "--peak-gbs")
    row = gpu_bandwidth(device_name)
    if row is None:
        return None
    if row.measured_copy_gbs is not None:
        return PeakBandwidth(row.measured_copy_gbs, "measured copy", row.gpu)
    return PeakBandwidth(row.datasheet_gbs, "datasheet", row.gpu)
