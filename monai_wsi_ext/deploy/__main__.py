"""``python -m monai_wsi_ext.deploy -i <slides> -o <output> -m <models>``: see :mod:`monai_wsi_ext.deploy.app`."""

from monai_wsi_ext.deploy.app import main

if __name__ == "__main__":
    main()
