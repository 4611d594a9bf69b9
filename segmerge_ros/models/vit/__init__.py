"""Plain-ViT segmenters and the token-reduction methods built on them: ALGM, ClustViT, DoViT."""
