"""The fast-linear wing: the model converters and everything behind them (kernel choice, hardware checks,
dense fp8 through torchao, the 2:4 sparse package and the compressed 2:4 export).

The rest of nanochat (model, loss, optimizer, data, training loop, checkpoint) reaches it only through
nanochat.accel.converters: the trainer builds one LinearConverter (a plan per layer: dense or 2:4, bf16 or
fp8), and inference rebuilds it with LinearConverter.from_meta from a checkpoint's meta."""
