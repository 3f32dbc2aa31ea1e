"""The GPT application: a nanoGPT-style model (``model``), its data sets (``data``), the trainer (``train``,
``python -m mars_ref.gpt.train``) and the plots of a run's metrics (``plot``). Nothing in the optimizer imports it."""
