"""Flow-matching objective, REPA alignment and ODE samplers, all in one time convention:
x_t = (1 - t) x0 + t eps, t = 1 is pure noise, the network predicts v = eps - x0."""
