"""Ray Train loops, losses, Tune searches, DeepSpeed configs and evaluation."""
