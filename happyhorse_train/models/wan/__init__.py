"""diffusers' Wan 2.1 / 2.2 models behind the generic boundary: text to video (WanPipeline) and image to video
(WanImageToVideoPipeline), with diffusers' own classes, so an outside client checks what trains here."""
