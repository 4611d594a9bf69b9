"""Mask2Former: pixel decoder (deformable attention, PRO-SCALE), transformer decoder, checkpoints, FLOPs."""
