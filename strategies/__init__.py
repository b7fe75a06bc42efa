"""How the model owner combines returned adapters: Flower Message-API strategies by name.

Every strategy here is one of Flower's (``flwr.serverapp.strategy``), configured from the
``strategy:`` section of the run config. The table maps each name to its Flower class and to
the config keys it reads; sampling (``clients_per_round``) is set the same way for all.
"""

from __future__ import annotations

from flwr.serverapp import strategy as flwr_strategies

from fl_offsite.errors import UserError

# Server learning rate when strategy.server_lr is unset. Adaptive optimizers take steps of
# about eta per coordinate, so their default is on the scale of an adapter's weight updates.
SERVER_LR_DEFAULTS = {"fedavgm": 1.0, "fedadam": 1e-3, "fedyogi": 1e-3, "fedadagrad": 1e-3}

# name -> (Flower class, {Flower argument: strategy config key})
STRATEGIES: dict[str, tuple[type, dict[str, str]]] = {
    "fedavg": (flwr_strategies.FedAvg, {}),
    "fedprox": (flwr_strategies.FedProx, {"proximal_mu": "proximal_mu"}),
    "fedavgm": (flwr_strategies.FedAvgM, {"server_learning_rate": "server_lr",
                                          "server_momentum": "server_momentum"}),
    "fedadam": (flwr_strategies.FedAdam, {"eta": "server_lr", "eta_l": "eta_l", "beta_1": "beta_1",
                                          "beta_2": "beta_2", "tau": "tau"}),
    "fedyogi": (flwr_strategies.FedYogi, {"eta": "server_lr", "eta_l": "eta_l",
                                          "beta_1": "beta_1", "beta_2": "beta_2", "tau": "tau"}),
    "fedadagrad": (flwr_strategies.FedAdagrad, {"eta": "server_lr", "eta_l": "eta_l",
                                                "tau": "tau"}),
    "median": (flwr_strategies.FedMedian, {}),
    "trimmed_mean": (flwr_strategies.FedTrimmedAvg, {"beta": "trim_beta"}),
    "krum": (flwr_strategies.MultiKrum, {"num_malicious_nodes": "num_malicious",
                                         "num_nodes_to_select": "krum_keep"}),
}


def build(cfg, num_clients: int, clients_per_round: int):
    """A Flower strategy sampling exactly ``clients_per_round`` of ``num_clients`` nodes."""
    if cfg.name not in STRATEGIES:
        raise UserError(f"strategy.name: unknown strategy {cfg.name!r}; use one of "
                        f"{', '.join(STRATEGIES)}")
    cls, params = STRATEGIES[cfg.name]
    if cfg.name == "krum" and clients_per_round < 2 * cfg.num_malicious + 3:
        raise UserError(f"strategy.num_malicious: Krum needs clients_per_round >= "
                        f"2 * num_malicious + 3 = {2 * cfg.num_malicious + 3}")
    values = {arg: getattr(cfg, key) for arg, key in params.items()}
    if "server_lr" in params.values() and cfg.server_lr is None:
        arg = next(a for a, k in params.items() if k == "server_lr")
        values[arg] = SERVER_LR_DEFAULTS[cfg.name]
    return cls(fraction_train=clients_per_round / num_clients, fraction_evaluate=0.0,
               min_train_nodes=clients_per_round, min_evaluate_nodes=0,
               min_available_nodes=clients_per_round, **values)
