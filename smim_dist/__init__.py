"""smim_dist: SemanticMIM pre-training of vision transformers at scale."""
