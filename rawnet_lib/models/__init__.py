"""RawNet2 as in the paper, its fast CPU path, the loss heads and checkpoints."""
