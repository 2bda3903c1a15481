"""Training data: ZAPBench condition splits and sliding windows, the stimulus covariates of a window, the loop's
own signals (causal dF/F and spike probabilities computed as the real-time side would), and the fingerprint that
ties an engine to the data it was trained on.
"""
