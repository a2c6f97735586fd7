"""From audio to numbers: embeddings across ranks, scores, EER and minDCF, calibration, confidence intervals."""
