"""ASE calculator for any Allegro model (the torch backend, the reference, or a loaded model)."""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .graph import AtomicGraph
from .potential import AllegroPotential


class AllegroCalculator(Calculator):
    """energy, free_energy, forces and (for periodic cells) stress in ASE units (eV, eV/Å, eV/Å^3).

    The neighbour list is rebuilt on every call, so results are always exact; reusing it between MD
    steps with a skin is future work.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: AllegroPotential, device: str | torch.device | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        graph = AtomicGraph.from_ase(self.atoms, r_max=self.model.config.r_max).to(device=self.device)
        want_stress = "stress" in properties and bool(self.atoms.pbc.all())
        out = self.model(graph, compute_forces=True, compute_stress=want_stress, create_graph=False)
        energy = float(out["energy"].detach()[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"].detach().cpu().double().numpy(),
        }
        if want_stress:
            stress = out["stress"].detach().cpu().double().numpy()[0]
            self.results["stress"] = np.array(
                [stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]]
            )
