"""Teacher fine-tuning (``distillery teachers finetune``): training data from a label set and its
curation decisions (:mod:`.data`), Grounding DINO targets, LoRA and the training loop
(:mod:`.detector`), and the run around them: checkpoints, resume, provenance, the output
preset and Ray Train (:mod:`.run`)."""
