"""What the train stage is made of: batches from the feature files, negatives (shared, mined,
cross-batch memory), warm starts from an earlier run or bundle, encoding with a trained model."""
