"""Functional ops behind the yoloattn layers: each has a fast and a reference implementation."""

from .routed_attention import routed_attention, routed_attention_fast, routed_attention_reference

__all__ = ["routed_attention", "routed_attention_fast", "routed_attention_reference"]
