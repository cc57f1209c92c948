//! What the bench measures, by name: its sections and the id of every measurement, as types.
//!
//! A misspelt section is refused on the command line (clap lists the valid ones), and a
//! misspelt measurement does not compile, so no check can silently lose its target to a
//! typo. Each id still renders as the string the JSON report has always carried
//! (`reads/seq/passthrough`), and parses back from it.

use std::fmt;
use std::str::FromStr;

use clap::ValueEnum;

/// A section of the bench and of its report, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Section {
    Latency,
    Metadata,
    Reads,
    Small,
    Footprint,
    Image,
    Guest,
    Update,
    /// Three guests at once over virtio-blk, then over virtio-pmem with DAX.
    Dax,
}

impl Section {
    /// Every section, in report order.
    pub fn all() -> &'static [Section] {
        Section::value_variants()
    }

    /// The name given to `--sections` and used as the section's key in the JSON.
    pub fn key(self) -> &'static str {
        match self {
            Section::Latency => "latency",
            Section::Metadata => "metadata",
            Section::Reads => "reads",
            Section::Small => "small",
            Section::Footprint => "footprint",
            Section::Image => "image",
            Section::Guest => "guest",
            Section::Update => "update",
            Section::Dax => "dax",
        }
    }

    /// The section's heading in the Markdown report.
    pub fn title(self) -> &'static str {
        match self {
            Section::Latency => "Mount-ready latency",
            Section::Metadata => "Metadata: a full walk with lstat",
            Section::Reads => "Large-file reads",
            Section::Small => "Many small files",
            Section::Footprint => "Daemon footprint",
            Section::Image => "Writing an image of the closure",
            Section::Guest => "Through a guest (TCG)",
            Section::Update => "Live closure updates",
            Section::Dax => "Many guests, one store: virtio-pmem with DAX (TCG)",
        }
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// An enum of fixed names: each variant with the one string it renders as and parses from.
macro_rules! names {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The name this value has in measurement ids.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| format!("unknown {} {s:?}", stringify!($name)))
            }
        }
    };
}

names! {
    /// What makes a closure's store paths appear somewhere, timed until it is ready.
    pub enum Mounter {
        Nixstorefs => "nixstorefs",
        BindFarm => "bindfarm",
    }
}

names! {
    /// A walk of the closure with lstat: of the store itself, or through a mount.
    pub enum Walk {
        Native => "native",
        /// The first walk of a fresh mount.
        Cold => "cold",
        /// A second walk of the same mount.
        Warm => "warm",
        /// A cold walk with the walker and the daemon on CPU 0.
        ColdOneCpu => "cold-one-cpu",
        /// The first walk of a fresh mount served over io_uring.
        ColdUring => "cold-uring",
        /// The same, walker and daemon on CPU 0.
        ColdOneCpuUring => "cold-one-cpu-uring",
    }
}

names! {
    /// How the large files are read.
    pub enum ReadPattern {
        /// Whole, in 1 MiB chunks.
        Sequential => "seq",
        /// 4 KiB preads at seeded random offsets.
        Random => "random",
    }
}

names! {
    /// What the large files are read through.
    pub enum ReadVia {
        Native => "native",
        Passthrough => "passthrough",
        NoPassthrough => "nopassthrough",
        Bindfs => "bindfs",
    }
}

names! {
    /// What the small files are read through.
    pub enum SmallVia {
        Native => "native",
        Passthrough => "passthrough",
        NoPassthrough => "nopassthrough",
        /// Passthrough, the mount served over io_uring.
        PassthroughUring => "passthrough-uring",
        /// Passthrough over io_uring, reader and daemon on CPU 0.
        PassthroughUringOneCpu => "passthrough-uring-one-cpu",
        /// Passthrough over /dev/fuse, reader and daemon on CPU 0.
        PassthroughOneCpu => "passthrough-one-cpu",
    }
}

names! {
    /// What of the daemon's is counted in the footprint section.
    pub enum Held {
        /// Resident memory, MiB.
        Rss => "rss",
        /// Open descriptors.
        Fds => "fds",
    }
}

names! {
    /// When the daemon's footprint is sampled.
    pub enum FootprintPoint {
        /// After a walk of the closure.
        Walk => "walk",
        /// After a walk of the closure with the store path of many files.
        BigWalk => "big-walk",
        /// After that and reading each of those files.
        BigRead => "big-read",
    }
}

names! {
    /// A timed variant of the image section.
    pub enum ImageRun {
        CopyMkfs => "copy-mkfs",
        MkfsMount => "mkfs-mount",
        Mkimage => "mkimage",
        Copy => "copy",
        MkfsRegex => "mkfs-regex",
        MkimageLz4hc => "mkimage-lz4hc",
        CopyMkfsLz4hc => "copy-mkfs-lz4hc",
        CacheHit => "cache-hit",
    }
}

names! {
    /// An image whose size the image section reports.
    pub enum ImageOutput {
        MkimageLz4hc => "mkimage-lz4hc",
        MkfsLz4hc => "mkfs-lz4hc",
        Mkimage => "mkimage",
        Mkfs => "mkfs",
    }
}

names! {
    /// What serves `/nix/store` to a bench guest.
    pub enum GuestVia {
        /// nixstorefs's own vhost-user backend.
        Native => "native",
        /// virtiofsd sharing a nixstorefs mount.
        Nixstorefs => "nixstorefs",
        /// virtiofsd sharing a plain directory.
        Plain => "plain",
    }
}

names! {
    /// A step a bench guest times.
    pub enum GuestStep {
        Walk => "walk",
        WalkWarm => "walk-warm",
        Small => "small",
        Seq => "seq",
    }
}

names! {
    /// The most of something a share daemon held while a guest ran.
    pub enum Peak {
        Fds => "fds",
        /// Private resident memory (RssAnon), MiB.
        Anon => "anon",
    }
}

names! {
    /// What the live-update section measures.
    pub enum UpdateStep {
        /// From the update command's start to the guest seeing the new path, ms.
        GuestSeen => "guest-seen",
        /// The update command on the host mount, until it returns, ms.
        HostDone => "host-done",
        GuestAnonFirst => "guest-anon-first",
        GuestAnonLast => "guest-anon-last",
        GuestFdsFirst => "guest-fds-first",
        GuestFdsLast => "guest-fds-last",
        HostAnonFirst => "host-anon-first",
        HostAnonLast => "host-anon-last",
        HostFdsFirst => "host-fds-first",
        HostFdsLast => "host-fds-last",
    }
}

names! {
    /// Where the guests of the DAX section read their store from.
    pub enum DaxVia {
        /// A plain erofs image on a read-only virtio-blk drive.
        Blk => "blk",
        /// A `mkimage --dax` image over virtio-pmem, mounted with `dax=always`.
        Pmem => "pmem",
    }
}

names! {
    /// What the DAX section takes of each guest.
    pub enum DaxFigure {
        /// `find /nix/store -type f | xargs cat`, cold in the guest, s.
        Read => "read",
        /// qemu's RssAnon after the reads, MiB.
        QemuAnon => "qemu-anon",
        /// qemu's RssAnon after the reads less before them, MiB: what the guest's store
        /// costs the host in memory of that guest's own.
        QemuAnonGrowth => "qemu-anon-growth",
        /// qemu's RssFile after the reads, MiB: mapped file pages, shared.
        QemuFile => "qemu-file",
        /// The guest's `Cached:` after the reads, MiB.
        Cached => "cached",
        /// The guest's `Cached:` after the reads less before them, MiB.
        CachedGrowth => "cached-growth",
    }
}

/// The id of one measurement: which section it belongs to and what it is, spelt once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Id {
    /// `nixstorefs --version`: starting and ending the process only.
    ProcessStart,
    /// Mount-ready latency over a host store of `host` paths, a closure of `closure`.
    Latency {
        by: Mounter,
        host: usize,
        closure: usize,
    },
    Walk(Walk),
    Read(ReadPattern, ReadVia),
    Small(SmallVia),
    Footprint(Held, FootprintPoint),
    ImageTime(ImageRun),
    ImageSize(ImageOutput),
    GuestStep(GuestVia, GuestStep),
    /// The share daemon's peak during the timed guest boots.
    GuestDaemon(GuestVia, Peak),
    /// The share daemon's peak while a guest reads every file of the many-file path.
    GuestFootprint(GuestVia, Peak),
    /// Live closure updates.
    Update(UpdateStep),
    /// One figure per guest of the DAX section.
    Dax(DaxVia, DaxFigure),
}

impl Id {
    /// The section whose table lists this measurement.
    pub fn section(self) -> Section {
        match self {
            Id::ProcessStart | Id::Latency { .. } => Section::Latency,
            Id::Walk(_) => Section::Metadata,
            Id::Read(..) => Section::Reads,
            Id::Small(_) => Section::Small,
            Id::Footprint(..) => Section::Footprint,
            Id::ImageTime(_) | Id::ImageSize(_) => Section::Image,
            Id::GuestStep(..) | Id::GuestDaemon(..) | Id::GuestFootprint(..) => Section::Guest,
            Id::Update(_) => Section::Update,
            Id::Dax(..) => Section::Dax,
        }
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::ProcessStart => write!(f, "latency/process-start"),
            Id::Latency { by, host, closure } => write!(f, "latency/{by}/{host}/{closure}"),
            Id::Walk(w) => write!(f, "metadata/{w}"),
            Id::Read(p, v) => write!(f, "reads/{p}/{v}"),
            Id::Small(v) => write!(f, "small/{v}"),
            Id::Footprint(h, p) => write!(f, "footprint/{h}/{p}"),
            Id::ImageTime(r) => write!(f, "image/{r}"),
            Id::ImageSize(o) => write!(f, "image/size/{o}"),
            Id::GuestStep(v, s) => write!(f, "guest/{v}/{s}"),
            Id::GuestDaemon(v, p) => write!(f, "guest/{v}/daemon-{p}"),
            Id::GuestFootprint(v, p) => write!(f, "guest-footprint/{v}/{p}"),
            Id::Update(u) => write!(f, "update/{u}"),
            Id::Dax(v, x) => write!(f, "dax/{v}/{x}"),
        }
    }
}

impl FromStr for Id {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let number = |n: &str| {
            n.parse::<usize>()
                .map_err(|_| format!("{n:?} is not a count"))
        };
        let id = match parts[..] {
            ["latency", "process-start"] => Id::ProcessStart,
            ["latency", by, host, closure] => Id::Latency {
                by: by.parse()?,
                host: number(host)?,
                closure: number(closure)?,
            },
            ["metadata", w] => Id::Walk(w.parse()?),
            ["reads", p, v] => Id::Read(p.parse()?, v.parse()?),
            ["small", v] => Id::Small(v.parse()?),
            ["footprint", h, p] => Id::Footprint(h.parse()?, p.parse()?),
            ["image", "size", o] => Id::ImageSize(o.parse()?),
            ["image", r] => Id::ImageTime(r.parse()?),
            ["guest", v, x] => match x.strip_prefix("daemon-") {
                Some(p) => Id::GuestDaemon(v.parse()?, p.parse()?),
                None => Id::GuestStep(v.parse()?, x.parse()?),
            },
            ["guest-footprint", v, p] => Id::GuestFootprint(v.parse()?, p.parse()?),
            ["update", u] => Id::Update(u.parse()?),
            ["dax", v, x] => Id::Dax(v.parse()?, x.parse()?),
            _ => return Err(format!("{s:?} is not a measurement id")),
        };
        // One spelling per id: `latency/nixstorefs/0100/5` is not `.../100/5`.
        if id.to_string() != s {
            return Err(format!("{s:?} is not how {id} is written"));
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every id of the fixed-name kinds, and latency ids for a few sizes.
    fn every_id() -> Vec<Id> {
        let mut v = vec![Id::ProcessStart];
        for &by in Mounter::ALL {
            for (host, closure) in [(2_000, 100), (140_000, 2_500)] {
                v.push(Id::Latency { by, host, closure });
            }
        }
        v.extend(Walk::ALL.iter().map(|&w| Id::Walk(w)));
        for &p in ReadPattern::ALL {
            v.extend(ReadVia::ALL.iter().map(|&r| Id::Read(p, r)));
        }
        v.extend(SmallVia::ALL.iter().map(|&s| Id::Small(s)));
        for &h in Held::ALL {
            v.extend(FootprintPoint::ALL.iter().map(|&p| Id::Footprint(h, p)));
        }
        v.extend(ImageRun::ALL.iter().map(|&r| Id::ImageTime(r)));
        v.extend(ImageOutput::ALL.iter().map(|&o| Id::ImageSize(o)));
        for &g in GuestVia::ALL {
            v.extend(GuestStep::ALL.iter().map(|&s| Id::GuestStep(g, s)));
            v.extend(Peak::ALL.iter().map(|&p| Id::GuestDaemon(g, p)));
            v.extend(Peak::ALL.iter().map(|&p| Id::GuestFootprint(g, p)));
        }
        v.extend(UpdateStep::ALL.iter().map(|&u| Id::Update(u)));
        for &d in DaxVia::ALL {
            v.extend(DaxFigure::ALL.iter().map(|&x| Id::Dax(d, x)));
        }
        v
    }

    #[test]
    fn every_id_parses_back_to_itself_and_no_two_share_a_name() {
        let ids = every_id();
        let mut names: Vec<String> = ids.iter().map(Id::to_string).collect();
        for (id, name) in ids.iter().zip(&names) {
            assert_eq!(name.parse::<Id>().as_ref(), Ok(id), "{name}");
            assert!(
                name.starts_with(id.section().key()),
                "{name} is listed under {}",
                id.section()
            );
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ids.len());
    }

    #[test]
    fn ids_keep_the_names_the_reports_use() {
        for (id, name) in [
            (Id::ProcessStart, "latency/process-start"),
            (
                Id::Latency {
                    by: Mounter::BindFarm,
                    host: 140_000,
                    closure: 2_500,
                },
                "latency/bindfarm/140000/2500",
            ),
            (Id::Walk(Walk::ColdOneCpu), "metadata/cold-one-cpu"),
            (
                Id::Read(ReadPattern::Sequential, ReadVia::NoPassthrough),
                "reads/seq/nopassthrough",
            ),
            (
                Id::Footprint(Held::Rss, FootprintPoint::BigWalk),
                "footprint/rss/big-walk",
            ),
            (
                Id::ImageSize(ImageOutput::MkfsLz4hc),
                "image/size/mkfs-lz4hc",
            ),
            (
                Id::GuestDaemon(GuestVia::Plain, Peak::Anon),
                "guest/plain/daemon-anon",
            ),
            (
                Id::GuestFootprint(GuestVia::Native, Peak::Fds),
                "guest-footprint/native/fds",
            ),
            (
                Id::Dax(DaxVia::Pmem, DaxFigure::QemuAnonGrowth),
                "dax/pmem/qemu-anon-growth",
            ),
        ] {
            assert_eq!(id.to_string(), name);
        }
    }

    /// The committed reports' ids are the ones these types spell: a renamed variant would
    /// break the comparison of a new run with an old one.
    #[test]
    fn every_id_in_the_committed_reports_parses() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
        let mut seen = 0;
        for name in [
            "benchmarks.json",
            "benchmarks-guest.json",
            "benchmarks-image.json",
            "benchmarks-dax.json",
            "benchmarks-update.json",
            "benchmarks-guest-update.json",
            "benchmarks-cold-path.json",
        ] {
            let Ok(text) = std::fs::read_to_string(docs.join(name)) else {
                continue;
            };
            let report: serde_json::Value = serde_json::from_str(&text).expect(name);
            for m in report["measurements"].as_array().expect(name) {
                let id = m["id"].as_str().expect("an id");
                let parsed: Id = id.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(parsed.section().key(), m["section"], "{name}: {id}");
                seen += 1;
            }
        }
        assert!(
            seen > 0,
            "no committed report found under {}",
            docs.display()
        );
    }

    #[test]
    fn misspelt_ids_are_refused() {
        for bad in [
            "reads/sequential/native",
            "latency/nixstorefs/0100/5",
            "latency/nixstorefs/100",
            "guest/native/daemon-rss",
            "image/size/copy",
            "dax/virtiofs/read",
            "metadata",
            "",
        ] {
            assert!(bad.parse::<Id>().is_err(), "{bad:?} parsed");
        }
    }
}
