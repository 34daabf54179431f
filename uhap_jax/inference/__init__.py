"""The output side of animation: camera paths to render from, MP4 with the speech track, per-frame 3DGS PLY."""
