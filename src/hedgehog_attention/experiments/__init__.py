"""Experiment commands (`hedgehog recall | lm | finetuned-conversion | pretrained-conversion | attention-maps`)."""
