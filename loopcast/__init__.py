"""loopcast: real-time closed-loop whole-brain activity forecasting for light-sheet rigs. The one import package:
loopcast.realtime (the loop's stages), loopcast.replay (recordings and the simulated fish), loopcast.models (PyTorch
modules), loopcast.offline_training (training, evaluation, export), loopcast.config (the TOML loader every package may
use), and the app modules here (cli, settings, the demo). Imports nothing on its own."""
