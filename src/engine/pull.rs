//! Aggregates an image pull's per-layer messages into byte-exact image progress.

use std::collections::BTreeMap;

use crate::model::PullProgress;
use crate::runtime::{LayerStatus, PullEvent};

#[derive(Default)]
struct Layer {
    current: u64,
    total: Option<u64>,
    downloaded: bool,
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
            LayerStatus::Downloaded
            | LayerStatus::Extracting
            | LayerStatus::Done
            | LayerStatus::AlreadyExists => {
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

    /// Fraction done: by bytes when any size is known, else by layers.
    pub(crate) fn fraction(p: &PullProgress) -> f64 {
        if p.image_total_bytes > 0 {
            p.image_current_bytes as f64 / p.image_total_bytes as f64
        } else if p.layers_total > 0 {
            p.layers_done as f64 / p.layers_total as f64
        } else {
            0.0
        }
    }
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
        let p = t.finish();
        assert_eq!((p.image_current_bytes, p.image_total_bytes), (1500, 1500));
        assert_eq!((p.layers_done, p.layers_total), (3, 3));
        assert_eq!(PullTracker::fraction(&p), 1.0);
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
        assert_eq!(PullTracker::fraction(&t.finish()), 0.0);
    }
}
