"""Sequence-parallel scans: Mamba-2's SSD and the gated delta rule on the ring x Ulysses grid."""
