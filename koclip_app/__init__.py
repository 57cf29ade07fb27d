"""The demo app's own code, beside app.py and pages/: not part of the koclip library.

- `support`: what the pages need from koclip, without Streamlit (default model, Engine, gallery indexes).
- `ui`: the Streamlit pieces every page shares (sidebar, cached model, image input, charts).
"""
