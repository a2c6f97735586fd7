"""What the model is fed: audio probing and reading, utterance lists, the training loader and its
augmentation, trial lists, the dataset check."""
