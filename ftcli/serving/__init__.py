"""Serving a trained run over HTTP (`ftcli serve`): the engines that compute logits, the dynamic
micro-batcher that gathers concurrent requests into one forward pass, the FastAPI app with its
limits and errors, and its Prometheus metrics.

    engines   torch (the run's model/) or onnx (RUN/export/model.onnx or model.int8.onnx)
    batcher   a bounded queue fed by tokenizer threads; the engine thread takes what queued when free
    app       routes (/v1/predict, /v1/info, /v1/health, /metrics; TEI's /predict, /info, /health), auth and limits
    metrics   requests, errors, latency and batch sizes on one prometheus-client registry
"""
