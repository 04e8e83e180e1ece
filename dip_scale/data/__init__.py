"""ImageNet as MDS shards: the shared schema (imagenet), the converter (convert) and the
streaming loader used in training (streaming)."""
