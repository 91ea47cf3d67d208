"""Synthetic keyword-spotting data set (Speech Commands v2, 12-class task), made offline.

Speaks the Speech Commands words with Debian's text-to-speech engines (espeak-ng, flite,
festival + festvox voices), augments every clip (engine rate/pitch, resampling speed/pitch,
optional synthetic room reverb, +-100 ms time shift, synthetic background noise at a random
SNR, random gain), and caches only the MFCC features the ARM ML-Zoo / MLPerf Tiny DS-CNN
expects: 16 kHz, 640-sample (40 ms) frames, 320-sample (20 ms) stride -> 49 frames,
40 mel bins 20-4000 Hz, log, DCT, first 10 coefficients -> x of shape (n, 49, 10, 1).

The voices are split by speaker: no test voice (and no validation voice) is heard in
training. See benchmarks/KWS_DATA.md for the voice lists, licences and timings.

Run:
    python benchmarks/kws_data.py [--per-class-train N] [--seed S] [--out PATH] [--force]
                                  [--sanity-check]

Needs: apt-get install espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k
festvox-us-slt-hts (an engine that is missing is skipped, with a warning).

From Python (benchmarks/ is not a package: load this file with importlib, or put
benchmarks/ on sys.path and `import kws_data`):
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te), classes = kws_data.ensure_kws()  # or load_kws()
"""

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from fractions import Fraction

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "out", "kws", "kws_features.npz")

# Bump when anything that changes the generated data changes (invalidates caches).
GENERATOR_VERSION = 2

SAMPLE_RATE = 16000
CLIP_SAMPLES = 16000
# Feature settings of the ARM ML-Zoo / MLPerf Tiny DS-CNN (KWS).
FEATURES = {
    "sample_rate": SAMPLE_RATE,
    "frame_length": 640,  # 40 ms
    "frame_step": 320,  # 20 ms
    "fft_length": 1024,  # tf.signal.stft default for 640 (next power of 2)
    "window": "hann (periodic)",
    "spectrogram": "magnitude |STFT|",
    "num_mel_bins": 40,
    "lower_edge_hertz": 20.0,
    "upper_edge_hertz": 4000.0,
    "log_offset": 1e-6,
    "num_mfcc": 10,
    "frames": 49,
}

# ARM ML-Zoo / ML-examples order (silence, unknown, then the ten keywords).
CLASSES = ["_silence_", "_unknown_", "yes", "no", "up", "down", "left", "right",
           "on", "off", "stop", "go"]
KEYWORDS = CLASSES[2:]
UNKNOWN_WORDS = ["bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house",
                 "marvin", "nine", "one", "seven", "sheila", "six", "three", "tree", "two",
                 "wow", "zero", "learn", "follow", "forward", "backward", "visual"]
# Words and phrases spoken (by each split's own voices) to make babble noise; none is a
# keyword or an unknown word, nor sounds like one.
BABBLE_TEXTS = ["hello", "water", "people", "morning", "table", "window", "music", "paper",
                "garden", "little", "number", "later", "maybe", "coffee", "today", "yellow",
                "purple", "mountain", "river", "question", "answer", "computer", "station",
                "weather", "quiet", "hundred", "before", "after", "because", "nothing",
                "the weather is nice", "how are you", "see you later", "thank you very much",
                "what time is it", "where is the station", "a cup of coffee", "a nice garden",
                "the blue car", "please wait here"]
# Punctuation changes the engines' intonation (statement, exclamation, question).
TEXT_FORMS = [("{w}", 0.35), ("{w}.", 0.2), ("{w}!", 0.2), ("{w}?", 0.15), ("{W}", 0.1)]

# ---------------------------------------------------------------- voices and split
# espeak-ng: a voice is ACCENT+VARIANT. The split is by VARIANT (the timbre: formants,
# pitch range, breathiness, synthesizer), so no test/val variant is ever heard in training
# under any accent. The accents (pronunciation rules) are shared by all splits, as dialects
# are in Speech Commands.
ESPEAK_ACCENTS = ["en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                  "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
ESPEAK_VARIANTS = {
    "train": ["m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "croak", "whisper", "klatt",
              "klatt3", "adam", "Alex", "Alicia", "Andy", "Annie", "aunty", "benjamin",
              "caleb", "david", "ed", "edward", "grandpa", "iven", "john", "linda", "max",
              "Michael", "paul", "steph", "norbert", "quincy", "Storm"],
    "val": ["m6", "f4", "klatt4", "boris", "Gene", "anika", "travis", "rob"],
    "test": ["m7", "m8", "f5", "whisperf", "klatt2", "grandma", "belinda", "shelby",
             "victor", "Jacky"],
}
# Other engines, grouped by the recorded SPEAKER, because one speaker can have several
# renderings (flite kal, flite kal16 and festival kal_diphone are all Kal; flite slt and
# festival's HTS slt are both SLT). A speaker is in exactly one split.
#   (engine, voice, speaker, base F0 for flite/festival diphone pitch control or None)
OTHER_VOICES = {
    "train": [("flite", "kal", "kal", 105.0), ("flite", "kal16", "kal", 105.0),
              ("festival", "kal_diphone", "kal", 105.0), ("flite", "slt", "slt", 160.0),
              ("festival", "cmu_us_slt_arctic_hts", "slt", None),
              ("festival", "ked_diphone", "ked", 105.0)],
    "val": [("flite", "awb", "awb", 110.0)],
    "test": [("flite", "rms", "rms", None)],
}
ESPEAK_SHARE = 0.5  # share of clips spoken by espeak-ng in every split; the rest by the others
SPLITS = ("train", "val", "test")

NOISE_TYPES = [("white", 0.12), ("pink", 0.18), ("brown", 0.15), ("hum", 0.1),
               ("band", 0.15), ("babble", 0.3)]
SILENCE_NOISE_TYPES = [("white", 0.2), ("pink", 0.25), ("brown", 0.2), ("hum", 0.15),
                       ("band", 0.2)]

# Augmentation ranges (documented in KWS_DATA.md).
AUG = {
    "resample_speed": (0.85, 1.15),  # >1 = faster and higher (resampling)
    "espeak_rate_wpm": (130, 210),  # espeak-ng -s (default 175)
    "espeak_pitch": (20, 80),  # espeak-ng -p (default 50)
    "stretch": (0.85, 1.25),  # flite duration_stretch / festival Duration_Stretch
    "f0_scale": (0.8, 1.25),  # flite int_f0_target_mean / festival int_lr target_f0_mean
    "shift_ms": 100,
    "reverb_prob": 0.25,
    "rt60_s": (0.1, 0.5),
    "speech_rms_dbfs": (-32.0, -14.0),
    "snr_db": (3.0, 30.0),
    "clean_prob": 0.1,  # of the speech clips: SNR drawn from 30-45 dB instead
    "second_noise_prob": 0.3,
    "silence_rms_dbfs": (-65.0, -22.0),
}


def _log(msg):
    print(f"[kws_data {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- engines

def engine_available():
    return {
        "espeak-ng": shutil.which("espeak-ng") is not None,
        "flite": shutil.which("flite") is not None,
        "festival": shutil.which("festival") is not None,
    }


def _festival_voice_dirs():
    found = set()
    root = "/usr/share/festival/voices"
    if os.path.isdir(root):
        for lang in os.listdir(root):
            d = os.path.join(root, lang)
            if os.path.isdir(d):
                found.update(os.listdir(d))
    return found


def _flite_voices():
    try:
        out = subprocess.run(["flite", "-lv"], check=False, capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(out.replace("Voices available:", "").split())


def available_voices(split):
    """Voices of one split that this machine can speak: (espeak list, other list)."""
    avail = engine_available()
    esp = []
    if avail["espeak-ng"]:
        esp = [(a, v) for v in ESPEAK_VARIANTS[split] for a in ESPEAK_ACCENTS]
    fl = _flite_voices() if avail["flite"] else set()
    fest = _festival_voice_dirs() if avail["festival"] else set()
    other = []
    for eng, voice, spk, f0 in OTHER_VOICES[split]:
        if (eng == "flite" and voice in fl) or (eng == "festival" and voice in fest):
            other.append((eng, voice, spk, f0))
    return esp, other


def engine_versions():
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
            lines = [ln.strip() for ln in (r.stdout or r.stderr).splitlines() if ln.strip()]
            return next((ln for ln in lines if "version" in ln.lower()), lines[0])
        except (OSError, subprocess.SubprocessError, IndexError, StopIteration):
            return None

    pkgs = ["espeak-ng", "espeak-ng-data", "flite", "libflite1", "festival",
            "festvox-kallpc16k", "festvox-kdlpc16k", "festvox-us-slt-hts"]
    deb = {}
    for p in pkgs:
        try:
            r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", p], check=False,
                               capture_output=True, text=True, timeout=30)
            deb[p] = r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            deb[p] = None
    return {
        "espeak-ng": first_line(["espeak-ng", "--version"]),
        "flite": first_line(["flite", "--version"]),
        "festival": first_line(["festival", "--version"]),
        "debian_packages": deb,
    }


def _read_wav(path):
    with wave.open(path, "rb") as w:
        sr = w.getframerate()
        n = w.getnframes()
        ch = w.getnchannels()
        sw = w.getsampwidth()
        raw = w.readframes(n)
    if sw != 2:
        raise ValueError(f"{path}: {8 * sw}-bit audio, expected 16-bit")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1)
    return x, sr


def _run(cmd, timeout=120):
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr.strip()[:300]}")


def synth_espeak(text, accent, variant, rate, pitch, path):
    _run(["espeak-ng", "-v", f"{accent}+{variant}", "-s", str(int(rate)), "-p", str(int(pitch)),
          "-w", path, text])


def synth_flite(text, voice, stretch, f0, path):
    cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={stretch:.3f}"]
    if f0 is not None:
        cmd += ["--setf", f"int_f0_target_mean={f0:.1f}"]
    _run(cmd + ["-t", text, "-o", path])


def synth_festival_batch(items, workdir):
    """items: list of (text, voice, stretch, f0 or None, path), spoken by one festival process."""
    lines = []
    current = None
    for text, voice, stretch, f0, path in sorted(items, key=lambda it: it[1]):
        if voice != current:
            lines.append(f"(voice_{voice})")
            current = voice
        if f0 is not None:
            lines.append(f"(set! int_lr_params '((target_f0_mean {f0:.1f}) (target_f0_std 14)"
                         " (model_f0_mean 170) (model_f0_std 34)))")
        lines.append(f"(Parameter.set 'Duration_Stretch {stretch:.3f})")
        safe = text.replace("\\", "").replace('"', "")
        lines.append(f'(set! kwsutt (SynthText "{safe}"))')
        lines.append(f'(utt.save.wave kwsutt "{path}" \'riff)')
    script = os.path.join(workdir, "batch.scm")
    with open(script, "w") as f:
        f.write("\n".join(lines) + "\n")
    _run(["festival", "-b", script], timeout=600)


# ---------------------------------------------------------------- signal processing

def _resample(x, sr_in, sr_out):
    from scipy.signal import resample_poly

    if abs(sr_in - sr_out) < 1e-6:
        return x.astype(np.float32)
    frac = Fraction(sr_out / sr_in).limit_denominator(200)
    return resample_poly(x, frac.numerator, frac.denominator).astype(np.float32)


def _active_region(x, sr=SAMPLE_RATE, floor_db=-40.0):
    """(start, end) sample indices of the speech (10 ms frames within floor_db of the loudest)."""
    hop = sr // 100
    n = len(x) // hop
    if n == 0:
        return None
    e = (x[: n * hop].reshape(n, hop) ** 2).mean(axis=1)
    peak = e.max()
    if peak < 1e-9:
        return None
    on = np.nonzero(e > peak * 10 ** (floor_db / 10))[0]
    margin = 2  # 20 ms either side
    a = max(0, (on[0] - margin) * hop)
    b = min(len(x), (on[-1] + 1 + margin) * hop)
    return a, b


def _rms(x):
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + 1e-20))


def _colored_noise(rng, n, exponent):
    """Noise with power spectrum ~ 1/f**exponent (0 white, 1 pink, 2 brown)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    f[0] = f[1]
    spec *= f ** (-exponent / 2.0)
    return np.fft.irfft(spec, n)


def make_noise(kind, rng, babble_pool=None, n=CLIP_SAMPLES):
    """One second of unit-RMS noise of the given kind."""
    if kind == "white":
        y = rng.standard_normal(n)
    elif kind == "pink":
        y = _colored_noise(rng, n, 1.0)
    elif kind == "brown":
        y = _colored_noise(rng, n, 2.0)
    elif kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        f0 = rng.choice([50.0, 60.0]) * rng.uniform(0.98, 1.02)
        y = np.zeros(n)
        for k in range(1, 13):
            if f0 * k > 4000:
                break
            y += rng.uniform(0.2, 1.0) / k ** rng.uniform(0.3, 1.2) * np.sin(
                2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi))
        y /= _rms(y)
        floor = _colored_noise(rng, n, 1.0)
        y += 10 ** (rng.uniform(-30, -15) / 20) * floor / _rms(floor)
    elif kind == "band":
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
        lo = rng.uniform(80, 1500)
        hi = min(7900.0, lo * rng.uniform(1.5, 5.0))
        # smooth band edges (raised cosine over 20% of the band) to avoid ringing
        w = np.clip((f - lo) / (0.2 * lo), 0, 1) * np.clip((hi - f) / (0.2 * hi), 0, 1)
        y = np.fft.irfft(spec * np.sin(0.5 * np.pi * w) ** 2, n)
    elif kind == "babble":
        if not babble_pool:
            return make_noise("pink", rng, None, n)
        y = np.zeros(n)
        for _ in range(int(rng.integers(4, 9))):
            s = babble_pool[int(rng.integers(len(babble_pool)))]
            s = s / (_rms(s) + 1e-9) * rng.uniform(0.4, 1.0)
            buf = np.zeros(n)
            m = min(len(s), n)
            buf[:m] = s[:m]
            y += np.roll(buf, int(rng.integers(n)))
    else:
        raise ValueError(kind)
    return (y / (_rms(y) + 1e-12)).astype(np.float32)


def _pick(rng, choices):
    names = [c for c, _ in choices]
    p = np.array([w for _, w in choices], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _reverb(x, rng):
    rt60 = rng.uniform(*AUG["rt60_s"])
    n = int(rt60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    ir = rng.standard_normal(n) * np.exp(-6.908 * t / rt60)  # -60 dB at rt60
    ir[: int(0.002 * SAMPLE_RATE)] = 0.0
    ir *= rng.uniform(0.1, 0.5) / (np.sqrt(np.sum(ir ** 2)) + 1e-12)
    ir[0] = 1.0
    from scipy.signal import fftconvolve

    return fftconvolve(x, ir)[: len(x) + n].astype(np.float32)


def speech_to_clip(x, sr, aug, rng):
    """Raw TTS audio -> (speech in the 1 s window, speech RMS over its active part) or None."""
    x = x - x.mean()
    x = _resample(x, sr * aug["speed"], SAMPLE_RATE)  # speed/pitch by resampling
    reg = _active_region(x)
    if reg is None:
        return None
    x = x[reg[0]: reg[1]]
    max_len = int(0.95 * CLIP_SAMPLES)
    if len(x) > max_len:  # too long for 1 s: speed up to fit rather than cut the word
        x = _resample(x, len(x), max_len)[:max_len]
    if aug["reverb"]:
        x = _reverb(x, rng)
        reg = _active_region(x, floor_db=-45.0)
        x = x[reg[0]: reg[1]][: CLIP_SAMPLES]
    level = _rms(x)
    x = x / level * 10 ** (aug["speech_dbfs"] / 20)
    clip = np.zeros(CLIP_SAMPLES, np.float32)
    start = (CLIP_SAMPLES - len(x)) // 2 + aug["shift"]
    a, b = max(0, start), min(CLIP_SAMPLES, start + len(x))
    clip[a:b] = x[a - start: b - start]
    return clip, 10 ** (aug["speech_dbfs"] / 20)


def add_noise(clip, speech_rms, aug, rng, babble_pool):
    noise = make_noise(aug["noise"], rng, babble_pool)
    if aug["noise2"] is not None:
        noise = noise + rng.uniform(0.2, 0.6) * make_noise(aug["noise2"], rng, babble_pool)
        noise = noise / _rms(noise)
    y = clip + noise * speech_rms * 10 ** (-aug["snr_db"] / 20)
    return np.clip(y, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- plan

def _text_form(word, rng):
    form = _pick(rng, TEXT_FORMS)
    return form.format(w=word, W=word.capitalize())


def _draw_aug(rng, engine, voice_f0, kind):
    aug = {
        "speed": float(rng.uniform(*AUG["resample_speed"])),
        "reverb": bool(rng.random() < AUG["reverb_prob"]),
        "shift": int(rng.integers(-AUG["shift_ms"], AUG["shift_ms"] + 1) * SAMPLE_RATE // 1000),
        "speech_dbfs": float(rng.uniform(*AUG["speech_rms_dbfs"])),
        "seed": int(rng.integers(2 ** 63 - 1)),
    }
    if engine == "espeak-ng":
        aug["rate"] = int(rng.integers(AUG["espeak_rate_wpm"][0], AUG["espeak_rate_wpm"][1] + 1))
        aug["pitch"] = int(rng.integers(AUG["espeak_pitch"][0], AUG["espeak_pitch"][1] + 1))
    else:
        aug["stretch"] = float(rng.uniform(*AUG["stretch"]))
        aug["f0"] = None if voice_f0 is None else float(voice_f0 * rng.uniform(*AUG["f0_scale"]))
    if kind == "speech":
        clean = rng.random() < AUG["clean_prob"]
        aug["snr_db"] = float(rng.uniform(30, 45) if clean else rng.uniform(*AUG["snr_db"]))
        aug["noise"] = _pick(rng, NOISE_TYPES)
        second = rng.random() < AUG["second_noise_prob"]
        aug["noise2"] = _pick(rng, NOISE_TYPES) if second else None
    return aug


def _pick_voice(rng, esp, other):
    use_esp = esp and (not other or rng.random() < ESPEAK_SHARE)
    if use_esp:
        accent, variant = esp[int(rng.integers(len(esp)))]
        return {"engine": "espeak-ng", "accent": accent, "variant": variant,
                "voice": f"{accent}+{variant}", "f0": None}
    eng, voice, spk, f0 = other[int(rng.integers(len(other)))]
    return {"engine": eng, "voice": voice, "speaker": spk, "f0": f0}


def build_plan(settings):
    """Deterministic list of clip specs for every split, plus babble-pool specs.

    Each split has its own RNG stream (seed, split), so val and test do not change when only
    the training size changes."""
    plan, babble = {}, {}
    for k, split in enumerate(SPLITS):
        rng = np.random.default_rng([settings["seed"], k])
        esp, other = available_voices(split)
        if not esp and not other:
            raise RuntimeError(f"no TTS voice available for split {split!r}: install espeak-ng, "
                               "flite, festival")
        n = settings[f"per_class_{split}"]
        n_unknown = round(n * settings["unknown_factor"])
        n_silence = round(n * settings["silence_factor"])
        items = []
        for label, word in enumerate(CLASSES):
            if word == "_silence_":
                for _ in range(n_silence):
                    items.append({"label": label, "kind": "silence",
                                  "seed": int(rng.integers(2 ** 63 - 1)),
                                  "level_dbfs": float(rng.uniform(*AUG["silence_rms_dbfs"])),
                                  "noise": _pick(rng, SILENCE_NOISE_TYPES),
                                  "noise2": _pick(rng, SILENCE_NOISE_TYPES)
                                  if rng.random() < AUG["second_noise_prob"] else None})
                continue
            if word == "_unknown_":
                words = []
                while len(words) < n_unknown:
                    words.extend(rng.permutation(UNKNOWN_WORDS).tolist())
                words = words[:n_unknown]
            else:
                words = [word] * n
            for w in words:
                v = _pick_voice(rng, esp, other)
                items.append({"label": label, "kind": "speech", "word": w,
                              "text": _text_form(w, rng), **v,
                              "aug": _draw_aug(rng, v["engine"], v["f0"], "speech")})
        order = rng.permutation(len(items))
        plan[split] = [items[i] for i in order]
        babble[split] = []
        for i in range(settings["babble_pool"]):
            v = _pick_voice(rng, esp, other)
            t = BABBLE_TEXTS[i % len(BABBLE_TEXTS)]
            aug = _draw_aug(rng, v["engine"], v["f0"], "babble")
            aug["reverb"] = False
            aug["shift"] = 0
            babble[split].append({"kind": "speech", "text": t, "word": t, **v, "aug": aug})
    return plan, babble


# ---------------------------------------------------------------- workers

_BABBLE = {}  # split -> list of 1-D float32 arrays; set before forking the workers


def _synthesize(items, workdir):
    """Speak the items (speech kind) to wav files; return {index: (audio, sr)}."""
    out = {}
    fest = []
    for i, it in items:
        path = os.path.join(workdir, f"c{i}.wav")
        a = it["aug"]
        if it["engine"] == "espeak-ng":
            synth_espeak(it["text"], it["accent"], it["variant"], a["rate"], a["pitch"], path)
        elif it["engine"] == "flite":
            synth_flite(it["text"], it["voice"], a["stretch"], a["f0"], path)
        else:
            fest.append((it["text"], it["voice"], a["stretch"], a["f0"], path))
    if fest:
        synth_festival_batch(fest, workdir)
    for i, it in items:
        path = os.path.join(workdir, f"c{i}.wav")
        out[i] = _read_wav(path)
        os.remove(path)
    return out


def _retry_plain(it, workdir):
    """A clip whose synthesis gave no audible speech: speak the bare word at default settings."""
    it = dict(it, text=it["word"], aug=dict(it["aug"], rate=175, pitch=50, stretch=1.0,
                                            f0=None, speed=1.0))
    return it, _synthesize([(0, it)], workdir)[0]


def _work_chunk(args):
    """Make the 1 s clips of one chunk. Returns (split, indices, float32 array (k, 16000))."""
    split, idx_items, mode = args
    with tempfile.TemporaryDirectory(prefix="kws_tts_") as workdir:
        speech = [(i, it) for i, it in idx_items if it["kind"] == "speech"]
        raw = _synthesize(speech, workdir) if speech else {}
        clips = []
        for i, it in idx_items:
            if it["kind"] == "silence":
                rng = np.random.default_rng(it["seed"])
                y = make_noise(it["noise"], rng)
                if it["noise2"] is not None:
                    y = y + rng.uniform(0.2, 0.6) * make_noise(it["noise2"], rng)
                    y = y / _rms(y)
                y = np.clip(y * 10 ** (it["level_dbfs"] / 20), -1, 1).astype(np.float32)
                clips.append(y)
                continue
            rng = np.random.default_rng(it["aug"]["seed"])
            res = speech_to_clip(raw[i][0], raw[i][1], it["aug"], rng)
            if res is None:
                it2, (x, sr) = _retry_plain(it, workdir)
                res = speech_to_clip(x, sr, it2["aug"], rng)
                if res is None:
                    raise RuntimeError(
                        f"no speech from {it['engine']} {it['voice']} {it['text']!r}")
            clip, level = res
            if mode == "babble":
                reg = _active_region(clip)
                clips.append(clip[reg[0]: reg[1]] if reg else clip)
            else:
                clips.append(add_noise(clip, level, it["aug"], rng, _BABBLE.get(split)))
    if mode == "babble":
        return split, [i for i, _ in idx_items], clips
    return split, [i for i, _ in idx_items], np.stack(clips)


def _chunks(split, items, size, mode):
    # Festival clips go in their own chunks (one festival process per chunk).
    fest = [(i, it) for i, it in enumerate(items) if it.get("engine") == "festival"]
    rest = [(i, it) for i, it in enumerate(items) if it.get("engine") != "festival"]
    out = []
    for group, sz in ((fest, size * 2), (rest, size)):
        for k in range(0, len(group), sz):
            out.append((split, group[k: k + sz], mode))
    return out


def _run_pool(tasks, workers, label):
    results = []
    total = sum(len(t[1]) for t in tasks)
    done = 0
    t0 = time.time()
    last = 0.0
    ctx = mp.get_context("fork")
    with ctx.Pool(processes=workers) as pool:
        for res in pool.imap_unordered(_work_chunk, tasks):
            results.append(res)
            done += len(res[1])
            now = time.time()
            if now - last > 10 or done == total:
                last = now
                rate = done / max(now - t0, 1e-9)
                eta = (total - done) / max(rate, 1e-9)
                _log(f"{label}: {done}/{total} clips, {rate:.0f} clips/s, ETA {eta:.0f} s")
    return results


# ---------------------------------------------------------------- features

def mfcc_features(audio, batch=1024):
    """float32 (n, 16000) in [-1, 1] -> MFCC (n, 49, 10, 1) float32, with tf.signal."""
    import tensorflow as tf

    fs = FEATURES
    mel = None
    outs = []
    for k in range(0, len(audio), batch):
        pcm = tf.convert_to_tensor(audio[k: k + batch], tf.float32)
        stft = tf.signal.stft(pcm, frame_length=fs["frame_length"], frame_step=fs["frame_step"],
                              fft_length=fs["fft_length"], window_fn=tf.signal.hann_window)
        spec = tf.abs(stft)
        if mel is None:
            mel = tf.signal.linear_to_mel_weight_matrix(
                fs["num_mel_bins"], spec.shape[-1], fs["sample_rate"],
                fs["lower_edge_hertz"], fs["upper_edge_hertz"])
        log_mel = tf.math.log(tf.tensordot(spec, mel, 1) + fs["log_offset"])
        mfcc = tf.signal.mfccs_from_log_mel_spectrograms(log_mel)[..., : fs["num_mfcc"]]
        outs.append(mfcc.numpy()[..., None].astype(np.float32))
    if not outs:
        return np.zeros((0, fs["frames"], fs["num_mfcc"], 1), np.float32)
    x = np.concatenate(outs)
    assert x.shape[1:] == (fs["frames"], fs["num_mfcc"], 1), x.shape
    return x


# ---------------------------------------------------------------- main API

def make_settings(per_class_train=1000, per_class_val=200, per_class_test=200, seed=0,
                  unknown_factor=1.2, silence_factor=1.0, babble_pool=120):
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "per_class_train": int(per_class_train),
        "per_class_val": int(per_class_val),
        "per_class_test": int(per_class_test),
        "unknown_factor": float(unknown_factor),
        "silence_factor": float(silence_factor),
        "babble_pool": int(babble_pool),
        "classes": CLASSES,
        "unknown_words": UNKNOWN_WORDS,
        "features": FEATURES,
        "augmentation": AUG,
        "espeak_variants": ESPEAK_VARIANTS,
        "espeak_accents": ESPEAK_ACCENTS,
        "other_voices": {s: [list(v) for v in OTHER_VOICES[s]] for s in SPLITS},
        "espeak_share": ESPEAK_SHARE,
        "engines_available": engine_available(),
        # the voices this machine can speak decide the plan, so they are part of the cache key
        "voices_available": {s: [[list(v) for v in av] for av in available_voices(s)]
                             for s in SPLITS},
    }


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def sidecar_path(out):
    return os.path.splitext(out)[0] + ".json"


def cache_matches(out, settings):
    side = sidecar_path(out)
    if not (os.path.exists(out) and os.path.exists(side)):
        return False
    try:
        with open(side) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return meta.get("settings_hash") == settings_hash(settings)


def generate(settings, out=DEFAULT_OUT, workers=2, chunk=40):
    t_start = time.time()
    plan, babble_plan = build_plan(settings)
    for split in SPLITS:
        _log(f"{split}: {len(plan[split])} clips planned")

    # 1) babble pools (each split's own voices, so no voice leaks through the noise)
    t0 = time.time()
    tasks = []
    for split in SPLITS:
        tasks += _chunks(split, babble_plan[split], chunk, "babble")
    _BABBLE.clear()
    pools = {s: [None] * len(babble_plan[s]) for s in SPLITS}
    for split, idx, clips in _run_pool(tasks, workers, "babble pool"):
        for i, c in zip(idx, clips):
            pools[split][i] = c
    _BABBLE.update(pools)
    t_babble = time.time() - t0

    # 2) the clips (workers forked now inherit the babble pools)
    t0 = time.time()
    tasks = []
    for split in SPLITS:
        tasks += _chunks(split, plan[split], chunk, "clips")
    audio = {s: np.zeros((len(plan[s]), CLIP_SAMPLES), np.float32) for s in SPLITS}
    for split, idx, clips in _run_pool(tasks, workers, "clips"):
        audio[split][idx] = clips
    t_synth = time.time() - t0

    # 3) features
    t0 = time.time()
    _log("computing MFCC features with tf.signal")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(workers)
        tf.config.threading.set_inter_op_parallelism_threads(workers)
    except RuntimeError:
        pass
    arrays = {}
    for split in SPLITS:
        arrays[f"x_{split}"] = mfcc_features(audio[split])
        arrays[f"y_{split}"] = np.array([it["label"] for it in plan[split]], np.int64)
        del audio[split]
    t_feat = time.time() - t0

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.npz"
    np.savez_compressed(tmp, classes=np.array(CLASSES), **arrays)
    os.replace(tmp, out)

    counts = {s: {c: int((arrays[f"y_{s}"] == k).sum()) for k, c in enumerate(CLASSES)}
              for s in SPLITS}
    voices = {}
    for s in SPLITS:
        esp, other = available_voices(s)
        used = {}
        for it in plan[s]:
            if it["kind"] == "speech":
                key = f"{it['engine']}:{it['voice']}"
                used[key] = used.get(key, 0) + 1
        voices[s] = {
            "espeak-ng_variants": sorted({v for _, v in esp}),
            "espeak-ng_accents": sorted({a for a, _ in esp}),
            "other_speakers": sorted({spk for _, _, spk, _ in other}),
            "other_voices": [f"{e}:{v} (speaker {spk})" for e, v, spk, _ in other],
            "clips_per_voice": dict(sorted(used.items())),
        }
    per_word = {s: {} for s in SPLITS}
    for s in SPLITS:
        for it in plan[s]:
            if it["kind"] == "speech" and CLASSES[it["label"]] == "_unknown_":
                per_word[s][it["word"]] = per_word[s].get(it["word"], 0) + 1
    meta = {
        "settings": settings,
        "settings_hash": settings_hash(settings),
        "classes": CLASSES,
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "counts": counts,
        "unknown_word_counts": per_word,
        "voices": voices,
        "validation_split": "voices disjoint from train and test "
                            "(own espeak-ng variants, flite awb)",
        "engine_versions": engine_versions(),
        "generation_seconds": {"babble_pool": round(t_babble, 1), "synthesis": round(t_synth, 1),
                               "features": round(t_feat, 1),
                               "total": round(time.time() - t_start, 1)},
        "workers": workers,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "numpy": np.__version__,
                    "tensorflow": tf.__version__},
    }
    with open(sidecar_path(out), "w") as f:
        json.dump(meta, f, indent=1)
    _log(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB) and {sidecar_path(out)} "
         f"in {meta['generation_seconds']['total']:.0f} s")
    return meta


def load_kws(path=DEFAULT_OUT):
    """((x_train, y_train), (x_val, y_val), (x_test, y_test), classes) from the cache."""
    with np.load(path) as d:
        return ((d["x_train"], d["y_train"]), (d["x_val"], d["y_val"]),
                (d["x_test"], d["y_test"]), [str(c) for c in d["classes"]])


def ensure_kws(out=DEFAULT_OUT, force=False, workers=2, **kw):
    """Generate the cache if missing or made with other settings; return load_kws(out)."""
    settings = make_settings(**kw)
    if force or not cache_matches(out, settings):
        generate(settings, out, workers=workers)
    return load_kws(out)


# ---------------------------------------------------------------- sanity check

def sanity_check(path, epochs=15, seed=0):
    """Logistic regression and a small DS-CNN on the cached features; prints accuracies."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    try:
        import tf_keras as keras
    except ImportError:
        keras = tf.keras
    try:
        tf.config.threading.set_intra_op_parallelism_threads(2)
        tf.config.threading.set_inter_op_parallelism_threads(2)
    except RuntimeError:
        pass
    (xtr, ytr), (xva, yva), (xte, yte), classes = load_kws(path)
    res = {}
    t0 = time.time()
    sc = StandardScaler().fit(xtr.reshape(len(xtr), -1))

    def f(x):
        return sc.transform(x.reshape(len(x), -1))

    lr = LogisticRegression(max_iter=300, C=0.1).fit(f(xtr), ytr)
    res["logreg"] = {s: float(lr.score(f(x), y)) for s, x, y in
                     (("train", xtr, ytr), ("val", xva, yva), ("test", xte, yte))}
    res["logreg"]["seconds"] = round(time.time() - t0, 1)
    _log(f"logistic regression: {res['logreg']}")

    t0 = time.time()
    tf.random.set_seed(seed)
    mean, std = xtr.mean(axis=(0, 1, 2)), xtr.std(axis=(0, 1, 2)) + 1e-6

    def n(x):
        return (x - mean) / std

    L = keras.layers
    # A small DS-CNN (ARM ML-Zoo "DS-CNN S" layout): 10x4 conv stride 2, four depthwise-
    # separable blocks of 64, average pool, dense.
    blocks = []
    for _ in range(4):
        blocks += [L.DepthwiseConv2D(3, padding="same", use_bias=False), L.BatchNormalization(),
                   L.ReLU(), L.Conv2D(64, 1, use_bias=False), L.BatchNormalization(), L.ReLU()]
    model = keras.Sequential([
        L.Input((49, 10, 1)),
        L.Conv2D(64, (10, 4), strides=(2, 2), padding="same", use_bias=False),
        L.BatchNormalization(), L.ReLU(),
        *blocks,
        L.Dropout(0.4), L.GlobalAveragePooling2D(),
        L.Dense(len(classes), activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(n(xtr), ytr, validation_data=(n(xva), yva), epochs=epochs, batch_size=100,
              verbose=2)
    res["ds_cnn_s"] = {s: float(model.evaluate(n(x), y, verbose=0)[1]) for s, x, y in
                       (("train", xtr, ytr), ("val", xva, yva), ("test", xte, yte))}
    res["ds_cnn_s"]["epochs"] = epochs
    res["ds_cnn_s"]["params"] = int(model.count_params())
    res["ds_cnn_s"]["seconds"] = round(time.time() - t0, 1)
    pred = model.predict(n(xte), verbose=0).argmax(1)
    res["ds_cnn_s"]["test_per_class"] = {c: float((pred[yte == k] == k).mean())
                                         for k, c in enumerate(classes)}
    _log(f"DS-CNN (S): {res['ds_cnn_s']}")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class-train", type=int, default=1000,
                   help="training clips per keyword class (default 1000)")
    p.add_argument("--per-class-val", type=int, default=200)
    p.add_argument("--per-class-test", type=int, default=200)
    p.add_argument("--unknown-factor", type=float, default=1.2,
                   help="_unknown_ clips = factor x per-class count (default 1.2)")
    p.add_argument("--silence-factor", type=float, default=1.0,
                   help="_silence_ clips = factor x per-class count (default 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--workers", type=int, default=2, help="synthesis processes (default 2)")
    p.add_argument("--force", action="store_true", help="regenerate even if the cache matches")
    p.add_argument("--sanity-check", action="store_true",
                   help="then train logistic regression + a small DS-CNN and print accuracies")
    p.add_argument("--epochs", type=int, default=15, help="epochs of the sanity-check DS-CNN")
    a = p.parse_args(argv)

    avail = engine_available()
    for eng, ok in avail.items():
        if not ok:
            _log(f"WARNING: {eng} not found; its voices are skipped")
    settings = make_settings(a.per_class_train, a.per_class_val, a.per_class_test, a.seed,
                             a.unknown_factor, a.silence_factor)
    if not a.force and cache_matches(a.out, settings):
        _log(f"cache {a.out} matches these settings; nothing to do (--force regenerates)")
    else:
        generate(settings, a.out, workers=max(1, a.workers))
    if a.sanity_check:
        res = sanity_check(a.out, epochs=a.epochs, seed=a.seed)
        side = sidecar_path(a.out)
        with open(side) as f:
            meta = json.load(f)
        meta["sanity_check"] = res
        with open(side, "w") as f:
            json.dump(meta, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
