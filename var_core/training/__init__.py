"""Training of the VAR restoration models (``python -m var_core train ...``, see :mod:`.cli`).

VARestorer (ICLR 2026) released inference only; this package builds its training and, because no
pretrained weights can be fetched everywhere, the training from scratch of what it needs:

* :mod:`.degrade`, :mod:`.data`: paired LQ/HQ crops from any image folder (DiffBIR-style degradation);
  :mod:`.preview` writes sample pairs.
* :mod:`.vae`: the BSQ multi-scale VAE (tokenizer); :mod:`.teacher`: the iterative Infinity transformer;
  :mod:`.distill`: the one-step student (LoRA, KL to the teacher + image loss); :mod:`.export`: the
  student in the official ``varestorer.pth`` layout.
* :mod:`.common`: the shared loop (DDP under ``torchrun``, mixed precision, accumulation, resume, logs).
"""
