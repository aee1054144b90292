"""Data pipeline: annotation readers, the frozen-feature cache, datasets and collation."""

from .cache import CacheReport, FeatureCache, FeatureStore, default_cache_root, prepare_features
from .dataset import Collate, DataConfig, VLDataset, build_dataset, load_records, split_caption
from .readers import (BadSamples, ImageReader, detect_format, expand_braces, read_cc_sbu_align, read_coco,
                      read_jsonl, read_records, read_webdataset)

__all__ = ["BadSamples", "CacheReport", "Collate", "DataConfig", "FeatureCache", "FeatureStore", "ImageReader",
           "VLDataset", "build_dataset", "default_cache_root", "detect_format", "expand_braces", "load_records",
           "prepare_features", "read_cc_sbu_align", "read_coco", "read_jsonl", "read_records", "read_webdataset",
           "split_caption"]
