"""Streaming merges of personality vectors into a base model (task arithmetic, TIES, DARE) and their analysis."""

from personaedit.merge.analysis import cosine_matrix, layer_of, summarise
from personaedit.merge.config import MergeConfig, VectorRef, config_from_options, load_config, parse_vector_option
from personaedit.merge.engine import MergeResult, VectorFile, merge, model_folder
from personaedit.merge.methods import MERGE_METHODS, MergeOptions, get_merge_method

__all__ = [
    "MERGE_METHODS", "MergeConfig", "MergeOptions", "MergeResult", "VectorFile", "VectorRef", "config_from_options",
    "cosine_matrix", "get_merge_method", "layer_of", "load_config", "merge", "model_folder", "parse_vector_option",
    "summarise",
]
