"""Personality vectors: φ = θ_fine-tuned − θ_base, trained on dialogue in one persona, saved as a WeightEdit."""

from personaedit.vectors.distill import Example, big5_chat_examples, distill, training_questions
from personaedit.vectors.train import TrainedVector, train_vector

__all__ = ["Example", "TrainedVector", "big5_chat_examples", "distill", "train_vector", "training_questions"]
