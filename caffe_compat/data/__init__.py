"""Caffe's data path: record sources (LMDB `Datum`, image lists), `transform_param`,
pair and P x K samplers, prefetching threads. Floor 2: it imports `io/`, never `layers/`;
the Data/ImageData builders in `layers/data.py` use it.
"""
from .prefetch import (PrefetchingDataLayer, close_data_layers, data_layers, default_threads, load_reader_states,
                       reader_states, seed_data_layers, shard_data_layers)
from .samplers import BatchSampler, ClassBatchSampler, parse_sampler
from .sources import ImageListLayer, LmdbDataLayer, decode_image, resize_linear, set_sampler
from .transform import Transformer

__all__ = ["Transformer", "PrefetchingDataLayer", "LmdbDataLayer", "ImageListLayer", "BatchSampler",
           "ClassBatchSampler", "parse_sampler", "decode_image", "resize_linear", "data_layers", "reader_states", "load_reader_states",
           "seed_data_layers", "shard_data_layers", "set_sampler", "close_data_layers", "default_threads"]
