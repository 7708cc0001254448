"""Teacher fine-tuning (``distillery teachers finetune``): training data from a label set and its
curation decisions (:mod:`.data`), Grounding DINO targets, LoRA, one epoch and validation
(:mod:`.detector`), the loss (:mod:`.loss`), and the run around them: checkpoints, resume,
the output preset and Ray Train (:mod:`.run`); the mask decoder of SAM, SAM 2 and SAM-HQ in one
loop (:mod:`.sam`, its data :mod:`.sam_data`, one adapter per kind :mod:`.sam_kinds`, its run
:mod:`.sam_run`); preset.yaml and finetune.json for either or both (:mod:`.provenance`)."""
