//! Aggregates an image pull's per-layer messages into byte-exact image progress.

use std::collections::BTreeMap;

use crate::model::PullProgress;
use crate::runtime::{LayerStatus, PullEvent};

#[derive(Default)]
struct Layer {
    current: u64,
    total: Option<u64>,
    downloaded: bool,
    /// Present locally before the pull ("Already exists"): nothing to download.
    present: bool,
}

/// Per-layer bytes and the image aggregate. Layers that already exist locally, or whose
/// size the engine never reports (tiny layers), count as done with no bytes.
#[derive(Default)]
pub(crate) struct PullTracker {
    layers: BTreeMap<String, Layer>,
}

impl PullTracker {
    /// Folds one event in; returns the progress it produced, if it was about a layer.
    pub(crate) fn apply(&mut self, event: &PullEvent) -> Option<PullProgress> {
        let PullEvent::Layer {
            id,
            status,
            current,
            total,
        } = event
        else {
            return None;
        };
        let layer = self.layers.entry(id.clone()).or_default();
        // Only download messages carry the layer's (compressed) size; extraction
        // messages count other bytes.
        if let (LayerStatus::Downloading, Some(t)) = (status, total) {
            layer.total = Some(*t);
        }
        match status {
            LayerStatus::Pending => {}
            LayerStatus::Downloading => {
                if let Some(c) = current {
                    // Never report a layer going backwards (a retried download restarts).
                    layer.current = (*c).max(layer.current);
                }
            }
            LayerStatus::AlreadyExists => {
                layer.downloaded = true;
                layer.present = true;
            }
            LayerStatus::Downloaded | LayerStatus::Extracting | LayerStatus::Done => {
                layer.downloaded = true;
            }
        }
        if layer.downloaded {
            layer.current = layer.total.unwrap_or(layer.current);
        }
        if let Some(t) = layer.total {
            layer.current = layer.current.min(t);
        }
        Some(self.progress(id))
    }

    /// Marks every layer downloaded (the pull finished) and returns the final progress.
    pub(crate) fn finish(&mut self) -> PullProgress {
        for layer in self.layers.values_mut() {
            layer.downloaded = true;
            layer.current = layer.total.unwrap_or(layer.current);
        }
        self.progress("")
    }

    fn progress(&self, layer_id: &str) -> PullProgress {
        let (current, total) = self
            .layers
            .get(layer_id)
            .map_or((0, 0), |l| (l.current, l.total.unwrap_or(0)));
        PullProgress {
            layer_id: layer_id.to_owned(),
            current_bytes: current,
            total_bytes: total,
            image_current_bytes: self
                .layers
                .values()
                .filter(|l| l.total.is_some())
                .map(|l| l.current)
                .sum(),
            image_total_bytes: self.layers.values().filter_map(|l| l.total).sum(),
            layers_total: self.layers.len() as u32,
            layers_done: self.layers.values().filter(|l| l.downloaded).count() as u32,
        }
    }

    /// The layers to download (not present before the pull): the bytes known and done,
    /// and the expected size of all of them, a layer whose size is not known yet
    /// counting as the average known size (`None` when no size is known).
    fn download(&self) -> Download {
        let to_fetch: Vec<&Layer> = self.layers.values().filter(|l| !l.present).collect();
        let sized: Vec<&Layer> = to_fetch
            .iter()
            .copied()
            .filter(|l| l.total.is_some())
            .collect();
        let unknown = to_fetch
            .iter()
            .filter(|l| l.total.is_none() && !l.downloaded)
            .count();
        let known_total: u64 = sized.iter().filter_map(|l| l.total).sum();
        let expected = (known_total > 0).then(|| {
            let average = known_total as f64 / sized.len() as f64;
            known_total as f64 + unknown as f64 * average
        });
        Download {
            current: sized.iter().map(|l| l.current).sum(),
            expected,
            layers: to_fetch.len(),
            layers_done: to_fetch.iter().filter(|l| l.downloaded).count(),
        }
    }

    /// Fraction of the download done, following the bytes still to come. Layers
    /// already present count for nothing either way (an image whose first known layer
    /// is a local base layer is not nearly pulled). A layer still to download whose
    /// size is not known yet counts as the average of the known sizes; a layer done
    /// without a size ever reported (a tiny one) counts for nothing. With no size known
    /// at all, the share of the layers to download that are done.
    pub(crate) fn fraction(&self) -> f64 {
        let d = self.download();
        match d.expected {
            Some(expected) => d.current as f64 / expected,
            None if d.layers == 0 => 0.0,
            None => d.layers_done as f64 / d.layers as f64,
        }
    }

    /// Bytes still to download, counted like [`Self::fraction`]: `Some(0)` when every
    /// layer to download is done, `None` while no size is known.
    pub(crate) fn bytes_remaining(&self) -> Option<u64> {
        let d = self.download();
        match d.expected {
            Some(expected) => Some((expected - d.current as f64).max(0.0).round() as u64),
            None if d.layers_done == d.layers && d.layers > 0 => Some(0),
            None => None,
        }
    }
}

/// See [`PullTracker::download`].
struct Download {
    current: u64,
    expected: Option<f64>,
    layers: usize,
    layers_done: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, status: LayerStatus, current: Option<u64>, total: Option<u64>) -> PullEvent {
        PullEvent::Layer {
            id: id.into(),
            status,
            current,
            total,
        }
    }

    #[test]
    fn bytes_add_up_across_layers() {
        let mut t = PullTracker::default();
        t.apply(&ev("a", LayerStatus::AlreadyExists, None, None));
        t.apply(&ev("b", LayerStatus::Pending, None, None));
        t.apply(&ev("c", LayerStatus::Pending, None, None));
        let p = t
            .apply(&ev("b", LayerStatus::Downloading, Some(100), Some(1000)))
            .unwrap();
        assert_eq!((p.current_bytes, p.total_bytes), (100, 1000));
        assert_eq!((p.image_current_bytes, p.image_total_bytes), (100, 1000));
        let p = t
            .apply(&ev("c", LayerStatus::Downloading, Some(50), Some(500)))
            .unwrap();
        assert_eq!((p.image_current_bytes, p.image_total_bytes), (150, 1500));
        assert_eq!((p.layers_done, p.layers_total), (1, 3));
        // Download complete carries no bytes: the layer counts as its full size.
        let p = t
            .apply(&ev("b", LayerStatus::Downloaded, None, None))
            .unwrap();
        assert_eq!(p.image_current_bytes, 1050);
        // Extraction progress is about bytes extracted, not downloaded: ignored.
        let p = t
            .apply(&ev("c", LayerStatus::Extracting, Some(10), Some(500)))
            .unwrap();
        assert_eq!(p.image_current_bytes, 1500);
        assert_eq!(t.bytes_remaining(), Some(0));
        let p = t.finish();
        assert_eq!((p.image_current_bytes, p.image_total_bytes), (1500, 1500));
        assert_eq!((p.layers_done, p.layers_total), (3, 3));
        assert_eq!(t.fraction(), 1.0);
    }

    /// A layer whose size is not known yet weighs the average of the known sizes:
    /// 100 bytes of (1000 + 3000 + the average 2000).
    #[test]
    fn an_unsized_layer_weighs_the_average_known_size() {
        let mut t = PullTracker::default();
        t.apply(&ev("a", LayerStatus::Downloading, Some(100), Some(1000)));
        t.apply(&ev("b", LayerStatus::Downloading, Some(0), Some(3000)));
        t.apply(&ev("c", LayerStatus::Pending, None, None));
        assert_eq!(t.fraction(), 100.0 / 6000.0);
    }

    /// With no size known at all, the fraction is the share of the layers to fetch
    /// that are done (a present layer is not one of them).
    #[test]
    fn without_sizes_the_fraction_is_the_share_of_layers_done() {
        let mut t = PullTracker::default();
        t.apply(&ev("base", LayerStatus::AlreadyExists, None, None));
        for id in ["a", "b", "c", "d"] {
            t.apply(&ev(id, LayerStatus::Pending, None, None));
        }
        t.apply(&ev("a", LayerStatus::Done, None, None));
        assert_eq!(t.fraction(), 0.25);
        t.apply(&ev("b", LayerStatus::Done, None, None));
        t.apply(&ev("c", LayerStatus::Done, None, None));
        assert_eq!(t.fraction(), 0.75);
    }

    #[test]
    fn a_layer_never_goes_backwards() {
        let mut t = PullTracker::default();
        t.apply(&ev("a", LayerStatus::Downloading, Some(300), Some(1000)));
        let p = t
            .apply(&ev("a", LayerStatus::Downloading, Some(100), Some(1000)))
            .unwrap();
        assert_eq!(p.current_bytes, 300);
    }

    #[test]
    fn image_messages_are_not_layers() {
        let mut t = PullTracker::default();
        assert!(
            t.apply(&PullEvent::Image {
                status: "Digest: sha256:x".into()
            })
            .is_none()
        );
        t.finish();
        assert_eq!(t.fraction(), 0.0);
    }

    /// The sequence dockerd sends for an image whose base layer is local (issue 17):
    /// "Already exists" first, then the layers to fetch, announced and then
    /// downloaded. The fraction starts at 0, follows the bytes, and never jumps to the
    /// end because the first layer seen was present.
    #[test]
    fn a_present_base_layer_does_not_finish_the_pull() {
        let mb = 1 << 20;
        let mut events = vec![
            ev("base", LayerStatus::AlreadyExists, None, None),
            ev("big", LayerStatus::Pending, None, None),
            ev("small", LayerStatus::Pending, None, None),
            ev("tiny", LayerStatus::Pending, None, None),
        ];
        for step in 1..=8 {
            events.push(ev(
                "big",
                LayerStatus::Downloading,
                Some(step * mb),
                Some(8 * mb),
            ));
        }
        events.extend([
            ev("big", LayerStatus::Downloaded, None, None),
            ev("small", LayerStatus::Downloading, Some(mb / 2), Some(mb)),
            ev("small", LayerStatus::Downloaded, None, None),
            ev("tiny", LayerStatus::Done, None, None),
        ]);
        for e in ["big", "small"] {
            events.push(ev(e, LayerStatus::Extracting, Some(1), Some(2)));
            events.push(ev(e, LayerStatus::Done, None, None));
        }
        let mut t = PullTracker::default();
        let fractions: Vec<f64> = events
            .iter()
            .map(|e| {
                t.apply(e);
                t.fraction()
            })
            .collect();
        assert!(fractions[..4].iter().all(|f| *f == 0.0), "{fractions:?}");
        let mut t2 = PullTracker::default();
        for e in &events[..4] {
            t2.apply(e);
        }
        assert_eq!(t2.bytes_remaining(), None, "no size known yet");
        t2.apply(&events[4]);
        // 7 MiB of "big" left, "small" and "tiny" at the average known size (8 MiB).
        assert_eq!(t2.bytes_remaining(), Some(7 * mb + 2 * 8 * mb));
        let downloading = &fractions[4..12];
        assert!(
            downloading.windows(2).all(|w| w[0] < w[1]),
            "the fraction follows the bytes: {fractions:?}"
        );
        // While "small" and "tiny" have no size, they count as the average known one.
        assert!(
            downloading[0] > 0.0 && downloading[0] < 0.1,
            "{fractions:?}"
        );
        assert!(downloading[7] < 0.6, "{fractions:?}");
        assert!(fractions.windows(2).all(|w| w[0] <= w[1]), "{fractions:?}");
        assert_eq!(*fractions.last().unwrap(), 1.0);
    }
}
