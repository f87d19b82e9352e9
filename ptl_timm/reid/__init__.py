"""Person re-identification with PTL: MGN / MGN_PTL and BNNeck models, retrieval metrics, data, losses,
cross-batch memories and the recipe's training loop (``train_reid``, ``ptl-timm train-reid``).

Importing it registers ``mgn_resnet50``, ``ptl_mgn_resnet50`` and the ``reid_*`` models in timm.
"""
from ..data.reid import (
    PKBatchSampler,
    ReIDDataset,
    ReIDSample,
    ReIDSplits,
    read_dukemtmc,
    read_list_file,
    read_market1501,
    read_msmt17,
    read_reid_folder,
)
from ..data.tables import ArrayTable, FolderTable, ImageTable, ReIDData, emoji_reid_data, read_reid_data
from .bnneck import ReIDNet, create_reid_model
from .distance import pairwise_distance
from .extract import FeatureExtractor
from .losses import ReIDLoss, ReIDOutput, TripletLoss, batch_hard_triplet_loss
from .memory import IdentityMemory, XBMemory, identity_centroids
from .metrics import RetrievalResult, evaluate, evaluate_rankings
from .mgn import MGN
from .rerank import re_ranking
from .train import ReIDTrainConfig, create_model, evaluate_data, train_reid

__all__ = [
    'MGN', 'ReIDNet', 'create_reid_model', 'FeatureExtractor',
    'evaluate', 'evaluate_rankings', 'pairwise_distance', 're_ranking', 'RetrievalResult',
    'ReIDLoss', 'ReIDOutput', 'TripletLoss', 'batch_hard_triplet_loss',
    'read_market1501', 'read_dukemtmc', 'read_msmt17', 'read_list_file', 'read_reid_folder',
    'ReIDDataset', 'ReIDSample', 'ReIDSplits', 'PKBatchSampler',
    'IdentityMemory', 'XBMemory', 'identity_centroids',
    'ImageTable', 'ArrayTable', 'FolderTable', 'ReIDData', 'read_reid_data', 'emoji_reid_data',
    'ReIDTrainConfig', 'train_reid', 'create_model', 'evaluate_data',
]
