"""Runtimes on external federated-learning engines.

`fedsrd.integrations.flower` runs the same algorithms, wire codec and `FederatedTrainer` on Flower (``pip install
'fedsrd[flower]'``): a ServerApp for the coordinator and a ClientApp for each data owner's SuperNode;
`fedsrd.integrations.flower_loopback` runs them as a deployment on one machine, and `fedsrd.integrations.inprocess`
in one Python process. Nothing here is imported by ``import fedsrd``; the engine stays an optional dependency.
"""
