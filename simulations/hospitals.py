"""The virtual hospitals of a simulation: which patients each one holds, and the held-out test patients.

Computed with the very functions the simulated nodes and the coordinator call
(:mod:`client.hospital_data`), so the plot and the baselines describe the split the federation trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.hospital_data import simulation_partition, simulation_pool, split_train_val
from common.partitioning import partition_summary
from common.records import ImageRecord
from simulations.partition_plot import plot_partitions
from simulations.presets import SimulationConfig


@dataclass(frozen=True)
class VirtualHospitals:
    """Records per hospital (index = Flower partition id) and of the held-out test set."""

    config: SimulationConfig
    partitions: tuple[tuple[ImageRecord, ...], ...]
    test: tuple[ImageRecord, ...]

    def summary(self) -> dict:
        """Counts per hospital and of the test set (no file names, no patient ids)."""
        return {"hospitals": partition_summary(self.partitions),
                "test": partition_summary([self.test])[0] if self.test else None}

    def with_validation(self) -> int:
        """Hospitals whose own train/validation split (run config ``val-fraction``, by patient) leaves them a
        validation split: a hospital of one patient has none, and neither has one of two at val-fraction < 0.25
        (``common.splits`` rounds to whole patients)."""
        run = self.config.run
        return sum(1 for part in self.partitions
                   if split_train_val(list(part), val_fraction=run.val_fraction, seed=run.seed)[1])

    def plot(self, out: Path) -> Path:
        run = self.config.run
        scheme = run.sim_partition + (f" (alpha {run.sim_dirichlet_alpha:g})" if run.sim_partition == "dirichlet"
                                      else "")
        title = (f"{len(self.partitions)} virtual hospitals, {scheme} partition by patient, seed {run.seed}")
        return plot_partitions(self.partitions, out, title=title, test=self.test)


def virtual_hospitals(data_dir: Path, sim: SimulationConfig) -> VirtualHospitals:
    """Cut the data set in `data_dir` as `sim` says (ValueError when it cannot be cut that way)."""
    data_dir = Path(data_dir).expanduser().resolve()
    run = sim.run
    _, test = simulation_pool(data_dir, run)
    parts = tuple(tuple(simulation_partition(data_dir, run, partition_id=k, num_partitions=sim.num_hospitals))
                  for k in range(sim.num_hospitals))
    return VirtualHospitals(config=sim, partitions=parts, test=tuple(test))
