"""A lab's simulator whose output names a data key none of its devices reads ('det_vaule' for 'det')."""

from ophyd.sim import SynAxis, SynSignal

from drivers.binding import InstrumentBinding


def Heater(**options):  # noqa: N802 - a factory, named like the instrument
    heater = SynAxis(name="heater")
    det = SynSignal(func=lambda: heater.readback.get() ** 2, name="det")
    return InstrumentBinding(name="heater", positioners={"x1": heater}, detectors=[det], outputs={"y": "det_vaule"},
                             limits={"x1": (-5.0, 10.0)})


def Forgetful(**options):  # noqa: N802 - a factory that forgot to return its binding
    SynAxis(name="forgotten")
