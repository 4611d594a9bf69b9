"""SegFormer (MiT encoder, all-MLP head) with Segformer++ merging, and its checkpoint formats."""
