"""Entry point of the MONAI Application Package: ``python <app folder> -i <input> -o <output> -m <models>``.

The MAP runs the app folder as a script (``python3 /opt/holoscan/app``), so ``scripts/build_map_app.py`` copies the
``monai_wsi_ext`` package next to this file; Python puts this folder first on ``sys.path``.
"""

from monai_wsi_ext.deploy.app import main

if __name__ == "__main__":
    main()
