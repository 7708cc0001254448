"""Teacher fine-tuning: Grounding DINO boxes and SAM masks on curated or COCO labels."""
