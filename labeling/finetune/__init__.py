"""Teacher fine-tuning (``distillery teachers finetune``): training data from a label set and its
curation decisions (:mod:`.data`), Grounding DINO targets, LoRA, one epoch and validation
(:mod:`.detector`), the loss (:mod:`.loss`), and the run around them: checkpoints, resume,
provenance, the output preset and Ray Train (:mod:`.run`)."""
