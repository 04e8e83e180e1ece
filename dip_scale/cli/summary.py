"""Print the parameter / compute table of a config's model without allocating it.

    dip-summary yamls/dip_xl16_600ep.yaml [model.head.type=none ...]

Built on the meta device, so XL/32 at 512 costs no memory. The last line is one JSON object
(params, params_trunk, params_head, gmacs_per_image, ...) for scripts.
"""
from __future__ import annotations

import json
import sys

from dip_scale.config import load_config_or_exit


def main(argv: list[str] | None = None) -> int:
    cfg = load_config_or_exit(sys.argv[1:] if argv is None else argv, "usage: dip-summary CONFIG.yaml [key.path=value ...]\n\n" + __doc__.strip())
    from dip_scale.models.summary import summarize

    s = summarize(cfg.model)
    head = "DiT-only (DiT final layer)" if s["head"] == "none" else f"{s['head']} head, {s['placement']}"
    print(f"{s['preset']} at {s['image_size']}x{s['image_size']}: {s['tokens']} tokens of "
          f"3x{s['patch_size']}x{s['patch_size']}, depth {s['depth']}, width {s['hidden_size']}; {head}")
    print(f"{'component':<10} {'params':>14} {'M':>9} {'GMACs/img':>10}")
    for name, p, g in (("trunk", s["params_trunk"], s["gmacs_trunk"]), ("head", s["params_head"], s["gmacs_head"]),
                       ("total", s["params"], s["gmacs_per_image"])):
        print(f"{name:<10} {p:>14,} {p / 1e6:>9.2f} {g:>10.2f}")
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
