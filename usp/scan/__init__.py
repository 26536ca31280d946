"""Sequence-parallel scans for hybrid models: Mamba-2's SSD, Mamba-1's selective scan, the gated
delta rule and the short causal convolution in front of them, exact on the ring x Ulysses grid
(docs/hybrid.md)."""

from usp.scan.conv import causal_conv
from usp.scan.delta import gated_delta_scan
from usp.scan.selective import selective_scan
from usp.scan.ssd import ssd_scan

__all__ = ["causal_conv", "gated_delta_scan", "selective_scan", "ssd_scan"]
