"""On-the-fly augmentation of training photos with Keras preprocessing layers.

The ranges follow the original project's ImageDataGenerator settings: rotation up to 15 degrees,
shifts up to 5% of height and width, horizontal flips, zoom 0.9 to 1.25, brightness 0.8 to 1.2.
"""

from dataclasses import asdict, dataclass

import keras


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation ranges; a zero range (or ``flip=False``) turns that transform off.

    Attributes:
        rotation: maximum rotation in degrees, either way.
        shift: maximum shift as a fraction of height and width, either way.
        flip: random horizontal flips.
        zoom: (min, max) scale of the visible field; below 1 zooms in, above 1 zooms out.
        brightness: (min, max) factor that pixel values are multiplied by.
    """

    rotation: float = 15.0
    shift: float = 0.05
    flip: bool = True
    zoom: tuple[float, float] = (0.9, 1.25)
    brightness: tuple[float, float] = (0.8, 1.2)

    @classmethod
    def off(cls) -> "AugmentConfig":
        """Return a configuration with every transform turned off."""
        return cls(rotation=0.0, shift=0.0, flip=False, zoom=(1.0, 1.0), brightness=(1.0, 1.0))

    @property
    def enabled(self) -> bool:
        """True when at least one transform changes the photos."""
        return self != AugmentConfig.off()

    def to_dict(self) -> dict:
        """Return the settings as plain JSON types."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


@keras.saving.register_keras_serializable(package="granja")
class RandomBrightnessScale(keras.layers.Layer):
    """Multiply each image by one random factor in [lower, upper], then clip to [0, 255].

    ``keras.layers.RandomBrightness`` adds an offset instead; the original project scaled
    pixel values (ImageDataGenerator's ``brightness_range``), so this layer keeps that meaning.
    """

    def __init__(self, lower: float, upper: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 < lower <= upper:
            raise ValueError(f"brightness range must satisfy 0 < lower <= upper (got {lower}, {upper})")
        self.lower = lower
        self.upper = upper
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=True):
        if not training:
            return inputs
        batch = keras.ops.shape(inputs)[0]
        factors = keras.random.uniform((batch, 1, 1, 1), self.lower, self.upper, seed=self.seed_generator)
        return keras.ops.clip(keras.ops.cast(inputs, "float32") * factors, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "lower": self.lower, "upper": self.upper, "seed": self.seed}


def build_augmenter(config: AugmentConfig, seed: int | None = None) -> keras.Sequential:
    """Build the augmentation layers for a batch of RGB photos in [0, 255].

    Returns an empty pipeline (the identity) when every transform is off.
    """
    layers = []
    if config.rotation > 0:
        layers.append(keras.layers.RandomRotation(config.rotation / 360.0, fill_mode="reflect", seed=seed))
    if config.shift > 0:
        layers.append(keras.layers.RandomTranslation(config.shift, config.shift, fill_mode="reflect", seed=seed))
    if config.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if config.zoom != (1.0, 1.0):
        # Keras's RandomZoom takes the change of the visible field: negative zooms in, positive out.
        low, high = config.zoom
        layers.append(keras.layers.RandomZoom((low - 1.0, high - 1.0), fill_mode="reflect", seed=seed))
    if config.brightness != (1.0, 1.0):
        layers.append(RandomBrightnessScale(*config.brightness, seed=seed))
    return keras.Sequential(layers, name="augment")
