"""The Gradio studio: layout, endpoints, uploads, the queue panel, the gallery and serving it."""
